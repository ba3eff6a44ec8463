"""The KV cache: keys and values of every layer in preallocated buffers, and one layer's view of them.

Row b's token at position p lives in slot p of row b; padding (position -1) is written to a spare
last slot that no query reads. A query at position p then attends slots 0..p of its row: the same
mask for prefill chunks and decode steps, with no per-row offsets. The cache is passed to the model
explicitly and never hidden inside modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixtral.config import MixtralConfig
from mixtral.errors import GenerationError


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: k, v [L, B, KV, S + 1, hd] (slot S is a bin for padding).

    `length` counts the tokens written per row so far (the longest row's next position); eager
    attention reads slots [0, length), a `static` cache always reads all S slots (fixed shapes for
    torch.compile).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    static: bool = False

    @classmethod
    def allocate(
        cls,
        config: MixtralConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        static: bool = False,
    ) -> KVCache:
        if max_len > config.max_seq_len:
            raise GenerationError(
                f"cache length {max_len} exceeds the model context of {config.max_seq_len} tokens"
            )
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len + 1, config.head_dim)
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k=zeros, v=zeros.clone(), static=static)

    @property
    def max_len(self) -> int:
        return self.k.shape[3] - 1


@dataclass
class LayerCache:
    """One layer's cache as attention sees it: new keys/values go to `slots_BT`, reads cover [0, attend).

    k, v [R, KV, S + 1, hd] are views into a `KVCache` (or any buffers of that shape); slots_BT [B, T]
    is each new token's slot (its position, or S for padding). `rows_B` None: the batch is the
    buffer's rows (B = R); else batch row b lives in buffer row rows_B[b] (a serving engine runs a
    few of its fixed rows per step). Holds no Python state that changes between decode steps, so a
    compiled step captures it as plain tensors and one integer.
    """

    k: torch.Tensor
    v: torch.Tensor
    slots_BT: torch.Tensor
    attend: int
    rows_B: torch.Tensor | None = None

    @classmethod
    def for_layers(
        cls,
        k_LRHSd: torch.Tensor,
        v_LRHSd: torch.Tensor,
        positions_BT: torch.Tensor,
        attend: int,
        rows_B: torch.Tensor | None = None,
    ) -> list[LayerCache]:
        """One view per layer; padding (position < 0) is written into the spare last slot."""
        slots_BT = torch.where(positions_BT < 0, k_LRHSd.shape[3] - 1, positions_BT)
        return [cls(k_LRHSd[i], v_LRHSd[i], slots_BT, attend, rows_B) for i in range(k_LRHSd.shape[0])]

    def update(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at their slots; all keys/values to attend, [B, KV, attend, hd]."""
        if self.rows_B is None:
            index = self.slots_BT[:, None, :, None].expand_as(k_BHTd)
            k = self.k.scatter_(2, index, k_BHTd)[:, :, : self.attend]
            v = self.v.scatter_(2, index, v_BHTd)[:, :, : self.attend]
            return k, v
        rows_BT = self.rows_B[:, None].expand_as(self.slots_BT)
        self.k[rows_BT, :, self.slots_BT] = k_BHTd.transpose(1, 2)  # indexed [B, T, KV, hd]
        self.v[rows_BT, :, self.slots_BT] = v_BHTd.transpose(1, 2)
        return self.k[self.rows_B, :, : self.attend], self.v[self.rows_B, :, : self.attend]
