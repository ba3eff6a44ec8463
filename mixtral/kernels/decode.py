"""The decode step in C++: the whole step in one call (`ops.decode_step`), else each block in one.

`apply_kernels` sets `Transformer.fused_step` to `FUSED_STEP` and every `Block.fused_decode` to
`FUSED_DECODE`. At a cached forward the model asks `fused_step` first, and each block its
`fused_decode`; each answers None (and the Python path runs) unless this is a decode step it can
take whole:

- one new token per row, at most `policy.KERNEL_MAX_ROWS` rows (and the MoE kernel's slot limit),
  fp32 activations and an fp32 KV cache, on the CPU, no autograd needed, not training, not inside
  torch.compile, the kernels built;
- wq, wk, wv, wo each a plain / `KernelLinear` (fp32 or bf16 weight), an int8 or bf16
  `CompressedLinear`, or a `GroupLinear`; the experts stacked fp32 / bf16, `CompressedExperts`, or
  `GroupExperts`; the MoE's dispatcher the kernel's own (`AutoDispatch` / `KernelDispatch`): a custom
  dispatcher (offloading, expert parallelism) keeps the Python path, which calls it;
- for the whole step, every block so, and the embedding, final norm and output head too (fp32, and
  a linear layer of the kinds above). Set `model.fused_step = None` to run block by block.

The weights are those the modules' own kernel calls read, so the fused step computes the same
products; it differs from the Python path only in the summation order of the norms, attention and
router (tests/unit/test_fused_decode.py holds them together).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from mixtral.errors import GenerationError
from mixtral.kernels import ops, policy
from mixtral.kernels.dispatch import AutoDispatch, KernelDispatch
from mixtral.model.transformer import rope_inv_freq

# (weight, scale, kind) of a linear layer for decode_layer: kind 0 = `ops.linear`, 4 / 8 = `ops.qlinear`.
LinearArgs = tuple[torch.Tensor, torch.Tensor | None, int]


def linear_args(module: nn.Module) -> LinearArgs | None:
    """What decode_layer needs to multiply by `module`'s weight, or None for a layer it cannot take."""
    if getattr(module, "qweight", None) is not None and hasattr(
        module, "bits"
    ):  # quant.groupwise.GroupLinear
        return module.qweight, module.scales, module.bits  # type: ignore[return-value]
    weight, scale = getattr(module, "weight", None), getattr(module, "scale", None)
    if not isinstance(weight, torch.Tensor) or getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, nn.Linear) and weight.dtype in policy.FLOAT_DTYPES:  # nn.Linear, KernelLinear
        return weight, None, 0
    # quant.rowwise.CompressedLinear: int8 with per-row scales, or bf16
    int8 = weight.dtype == torch.int8 and scale is not None
    if (
        hasattr(module, "storage")
        and weight.dim() == 2
        and (int8 or (weight.dtype == torch.bfloat16 and scale is None))
    ):
        return weight, scale, 0
    return None


def experts_args(experts: nn.Module) -> tuple[tuple[torch.Tensor | None, ...], int] | None:
    """((w1, w3, w2, s1, s3, s2), kind) for decode_layer's MoE, or None."""
    stacked = getattr(experts, "stacked", None)
    if stacked is None:
        return None
    tensors = tuple(stacked())
    if getattr(experts, "kernel_format", None) == "group":
        return tensors, int(experts.bits)  # type: ignore[attr-defined]
    if tensors[0].dtype not in policy.WEIGHT_DTYPES:
        return None
    return tensors, 0


class BlockArgs(NamedTuple):
    """decode_layer's arguments after the cache (in its order): one block's norms, matrices and experts."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    eps: float
    attn_w: list[torch.Tensor]  # wq, wk, wv, wo
    attn_s: list[torch.Tensor | None]
    attn_kind: list[int]
    n_heads: int
    gate: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    s1: torch.Tensor | None
    s3: torch.Tensor | None
    s2: torch.Tensor | None
    moe_kind: int
    top_k: int


def _build(block: nn.Module) -> BlockArgs | None:
    """decode_layer's per-block arguments, or None if some part is not one it takes."""
    attention, moe = block.attention, block.feed_forward
    if block.training or moe.training or type(moe.dispatcher) not in (AutoDispatch, KernelDispatch):
        return None  # training: the router's jitter and autograd need the modules
    if block.attention_norm.weight.dtype != torch.float32 or block.ffn_norm.weight.dtype != torch.float32:
        return None
    linears = [linear_args(getattr(attention, n)) for n in ("wq", "wk", "wv", "wo")]
    expert = experts_args(moe.experts)
    if any(a is None for a in linears) or expert is None or moe.gate.weight.dtype != torch.float32:
        return None
    return BlockArgs(
        block.attention_norm.weight, block.ffn_norm.weight, block.ffn_norm.eps,
        [a[0] for a in linears], [a[1] for a in linears], [a[2] for a in linears],  # type: ignore[index]
        attention.n_heads, moe.gate.weight, *expert[0], expert[1], moe.top_k,
    )  # fmt: skip


def _kept(module: nn.Module, key: str, build):
    """`build(module)`, kept on the module with what it was built from (`_watch`), rebuilt when that
    changed. Stored in the instance dict, not as a Module attribute: no state dict entry."""
    kept = module.__dict__.get(key)
    if kept is None or not _unchanged(kept[0]):
        kept = (_watch(module), build(module))
        module.__dict__[key] = kept
    return kept[1]


class FusedDecode:
    """Runs a `Block` for one decode step through `ops.decode_layer`, or answers None (see module doc).

    The per-block arguments are kept on the block (`_kept`), rebuilt when what they came from changed."""

    def __call__(
        self, block: nn.Module, x_BTD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cache
    ):
        B, T, D = x_BTD.shape
        if T != 1 or B > policy.KERNEL_MAX_ROWS or x_BTD.dtype != torch.float32 or x_BTD.device.type != "cpu":
            return None
        if torch.compiler.is_compiling() or cache.k.dtype != torch.float32:
            return None
        args = _kept(block, "_fused_decode_args", _build)
        if args is None or B * args.top_k > policy.KERNEL_MAX_SLOTS or not ops.available():
            return None
        if torch.is_grad_enabled() and (
            x_BTD.requires_grad or any(p.requires_grad for p in block.parameters())
        ):
            return None  # training-style call: autograd needs the modules
        cos, sin = cos_sin
        out, logits = ops.decode_layer(
            x_BTD.view(B, D), cache.slots_BT.view(B), cache.rows_B, cos.view(B, -1), sin.view(B, -1),
            cache.k, cache.v, *args,
        )  # fmt: skip
        return out.view(B, 1, D), logits.view(B, 1, -1)

    def __repr__(self) -> str:
        return "FusedDecode()"


FUSED_DECODE = FusedDecode()


Watch = tuple[tuple[dict, ...], tuple[str, ...], tuple[object, ...], tuple[dict, ...], tuple[int, ...]]


# Plain attributes the arguments (or the choice to fuse) depend on; a changed value is a new object.
_WATCHED_ATTRIBUTES = (
    "dispatcher",
    "top_k",
    "eps",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "training",
    "jitter",
)


def _watch(model: nn.Module) -> Watch:
    """Every (dict, key, object) a model's decode_step arguments come from: each module on the way from
    the model to the weights, each weight tensor, each MoE dispatcher and the attributes above, read
    back at every step to see that none was replaced (a swapped or quantized module, a `.to()`, a new
    dispatcher, a block put in training mode)."""
    entries: list[tuple[dict, str]] = []

    def module(m: nn.Module) -> None:
        entries.extend((m._parameters, k) for k in m._parameters)
        entries.extend((m._buffers, k) for k in m._buffers)
        for k, child in m._modules.items():
            entries.append((m._modules, k))
            if child is not None:
                module(child)
        entries.extend((m.__dict__, k) for k in _WATCHED_ATTRIBUTES if k in m.__dict__)

    module(model)
    dicts, keys = zip(*entries, strict=True)
    distinct = tuple({id(d): d for d in dicts}.values())  # and their sizes: an added module or tensor
    return dicts, keys, tuple(map(operator.getitem, dicts, keys)), distinct, tuple(map(len, distinct))


def _unchanged(watch: Watch) -> bool:
    dicts, keys, objs, distinct, sizes = watch
    if tuple(map(len, distinct)) != sizes:
        return False
    try:
        return all(map(operator.is_, map(operator.getitem, dicts, keys), objs))
    except KeyError:  # a module or tensor removed
        return False


# The per-layer lists of decode_step, in its order: BlockArgs' fields but eps, n_heads and top_k (one
# value for the model).
_STEP_LISTS = ("attention_norm", "ffn_norm", "attn_w", "attn_s", "attn_kind", "gate", "w1", "w3", "w2", "s1", "s3",
               "s2", "moe_kind")  # fmt: skip


class StepArgs(NamedTuple):
    """decode_step's arguments after the cache, positions first (inv_freq, then what follows the cache)."""

    inv_freq: torch.Tensor
    embedding: torch.Tensor
    norm: torch.Tensor
    out_w: torch.Tensor
    out_s: torch.Tensor | None
    out_kind: int
    eps: float
    n_heads: int
    top_k: int
    layers: tuple[list, ...]


class FusedStep:
    """A whole decode step through `ops.decode_step` when every block is one `FusedDecode` takes (and the
    embedding, final norm and output head are fp32 / a linear it reads), else None: then each block
    still asks its own `fused_decode`. One call per step instead of one per block: on a model whose
    weights stream from DRAM every step, the interpreter's own data is cold at each step, and the
    per-block Python cost several times its micro-benchmark."""

    def __call__(self, model: nn.Module, tokens, positions, k_cache, v_cache, rows):
        B = tokens.shape[0]
        args = self._args(model, B, tokens.device, k_cache.dtype)
        if args is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return None
        logits, router = ops.decode_step(
            tokens.view(B), positions.view(B), rows, args.inv_freq, k_cache, v_cache, *args[1:]
        )
        return logits.view(B, 1, -1), router.view(len(model.layers), B, 1, -1)

    def bind(self, model: nn.Module, cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """A decode loop's step (`make_decode_step`) with the model's weights taken now, as a `StepPlan`:
        (token_B, position_B) -> logits [B, V], writing the cache and advancing `cache.length`, and as
        `step.greedy` the same step returning the greedy tokens [B]; None where `__call__` would hand
        back (then the loop runs the model's forward).

        Per step it skips what the forward and `__call__` redo every time: the watch over the model's
        modules, the forward's input checks (the op still checks ids and positions) and the marshalling
        of ~100 weight tensors; ~0.5 ms of a ~6.5 ms bench-791m int4 step, the interpreter's data being
        cold after the weights streamed through. So the step keeps the weights it was bound with: a
        model changed after binding needs a new step (`generate_ids` binds one per request)."""
        args = self._args(model, cache.k.shape[1], cache.k.device, cache.k.dtype)
        if args is None:
            return None
        # Every Python operation of a step runs with its code and data evicted by the weights (~20x
        # its warm cost): the step is kept to a few. No grad mode: the plan's method is no op that
        # autograd sees, and its results require no grad.
        logits_of, greedy_of = ops.plan_steps(ops.step_plan(*args))
        k_cache, v_cache, max_len = cache.k, cache.v, cache.max_len

        def refuse() -> None:
            raise GenerationError(
                f"{cache.length} cached + 1 new token exceed the cache length of {max_len}"
                if cache.k is k_cache
                else "the KV cache was replaced after this decode step was bound to it"
            )

        def step(token_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
            if cache.length >= max_len or cache.k is not k_cache:
                refuse()
            logits = logits_of(token_B, position_B, k_cache, v_cache)
            cache.length += 1
            return logits

        def greedy(token_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
            """step's greedy next tokens [B] (== step(...).argmax(-1)), the argmax taken in C++ while the
            logits are in cache: a separate torch.argmax costs ~100 µs a step, its code cold."""
            if cache.length >= max_len or cache.k is not k_cache:
                refuse()
            ids = greedy_of(token_B, position_B, k_cache, v_cache)
            cache.length += 1
            return ids

        step.greedy = greedy  # type: ignore[attr-defined]
        return step

    def _args(
        self, model: nn.Module, B: int, device: torch.device, cache_dtype: torch.dtype
    ) -> StepArgs | None:
        """The model's kept step arguments if a step of B rows on a cache of this device and dtype can
        run whole in C++ (autograd aside: `__call__` checks it, a bound step runs without it), else None."""
        if B > policy.KERNEL_MAX_ROWS or device.type != "cpu" or cache_dtype != torch.float32:
            return None
        if model.training or torch.compiler.is_compiling():
            return None
        args = _kept(model, "_fused_step_args", self._build)
        if args is None or B * args.top_k > policy.KERNEL_MAX_SLOTS or not ops.available():
            return None
        return args

    @staticmethod
    def _build(model: nn.Module) -> StepArgs | None:
        if model.training:
            return None
        blocks = [_build(b) for b in model.layers]
        out = linear_args(model.output)
        emb, norm = model.tok_embeddings.weight, model.norm.weight
        if (
            any(b is None for b in blocks)
            or out is None
            or emb.dtype != torch.float32
            or norm.dtype != torch.float32
        ):
            return None
        # decode_step takes each of decode_layer's arguments as a list over the layers (wq..wo flattened)
        per_layer = [[getattr(b, f) for b in blocks] for f in BlockArgs._fields]
        for f in ("attn_w", "attn_s", "attn_kind"):
            per_layer[BlockArgs._fields.index(f)] = [x for b in blocks for x in getattr(b, f)]
        layers = tuple(per_layer[BlockArgs._fields.index(f)] for f in _STEP_LISTS)
        cfg = model.config
        return StepArgs(rope_inv_freq(cfg.head_dim, cfg.rope_theta), emb, norm, *out, model.norm.eps,
                        cfg.n_heads, cfg.top_k, layers)  # fmt: skip


FUSED_STEP = FusedStep()
