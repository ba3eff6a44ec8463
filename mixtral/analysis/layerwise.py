"""Router logits of a checkpoint computed layer by layer, for models larger than memory.

`LayerwiseModel(path)` never holds more than one decoder layer's weights: it embeds every batch,
then loads layer 0 from the checkpoint (straight from the safetensors mmap), runs all batches
through it, frees it, loads layer 1, and so on. Memory is one layer (Mixtral 8x7B: 1.4B parameters,
2.8 GB in bf16) plus the hidden states of all batches (tokens · dim · dtype: 1M tokens of 8x7B in
bf16 is 8 GB) plus fp32 router logits (tokens · L · E · 4 bytes), instead of the whole model
(93 GB in bf16). The output head is never loaded: routing does not need it.

The numbers are those of `Transformer.forward(tokens, positions=...)`, layer for layer (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mixtral.checkpoint import CheckpointReader, build_meta, read_config
from mixtral.checkpoint.safetensors_io import check_dtype
from mixtral.model.transformer import rope_cos_sin, segment_mask


class LayerwiseModel:
    """A checkpoint run one layer at a time over a list of batches (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        check_finite: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        check_dtype(dtype)
        self.path, self.dtype, self.check_finite = Path(path), dtype, check_finite
        self.device = torch.device(device)
        self.config = read_config(self.path)[0]

    def _load(self, reader: CheckpointReader, prefix: str) -> dict[str, torch.Tensor]:
        return {
            name.removeprefix(prefix): reader.read(
                name,
                out=torch.empty(shape, dtype=self.dtype, device=self.device),
                check_finite=self.check_finite,
            )
            for name, shape in reader.shapes.items()
            if name.startswith(prefix)
        }

    @torch.inference_mode()
    def router_logits(
        self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], progress: bool = False
    ) -> list[torch.Tensor]:
        """For each (tokens [B, T], positions [B, T]) batch: router logits [L, B, T, E] in fp32, on the
        CPU; the layers and hidden states live on `device`."""
        cfg = self.config
        batches = [(tokens.to(self.device), positions.to(self.device)) for tokens, positions in batches]
        for tokens, _ in batches:
            if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
        with CheckpointReader(self.path) as reader:  # validated once; layers read lazily
            emb = self._load(reader, "tok_embeddings.")["weight"]
            hidden = [F.embedding(tokens, emb) for tokens, _ in batches]
            del emb
            out = [torch.empty(cfg.n_layers, *tokens.shape, cfg.n_experts) for tokens, _ in batches]
            skeleton = build_meta(cfg)
            for i in tqdm(range(cfg.n_layers), desc="layers", disable=not progress, dynamic_ncols=True):
                block = skeleton.layers[i]
                block.load_state_dict(self._load(reader, f"layers.{i}."), strict=True, assign=True)
                for b, (_, positions) in enumerate(batches):
                    cos_sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
                    hidden[b], logits = block(hidden[b], cos_sin, segment_mask(positions), None)
                    out[b][i] = logits.cpu()
                block.to("meta")  # frees this layer's weights before the next one loads
        return out
