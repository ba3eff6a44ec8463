"""The compiled CPU kernel ops: built on first use, loaded once, callable as torch.ops.mixtral_cpu.*.

`cpu_kernels.cpp`, `cpu_dots.cpp` and `cpu_qgroup.cpp` (group-quantized weights) are compiled once
per machine and kernel version with torch's extension builder (needs a C++ compiler; ninja comes
with this package's dependencies). If that fails, or `MIXTRAL_NO_KERNELS=1` is set, `available()`
is False and callers use ATen (the decisions live in `mixtral.kernels.policy`). `python -m
mixtral.kernels` builds them ahead of time (setup.sh does).

The build cache is content-addressed: a directory named after a hash of the kernel sources, the
compiler flags, torch, Python and the CPU's instruction-set flags (the code is built with
-march=native), under $MIXTRAL_KERNELS_CACHE, else $TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions. The sources are copied there and built from the copy, so every checkout
with the same kernels shares one build, and a finished build is loaded straight from its library
(a `BUILT` marker) without running ninja again, whichever ninja is on PATH. Builds are serialised
by an `flock` on `<dir>.lock`, which the kernel releases when a process dies: a killed build
leaves no lock that makes the next command wait forever (torch's own lock file is removed while
the flock is held, since nobody else can be building).
The ops are registered with torch.library (`torch.ops.mixtral_cpu.*`) with fake implementations,
so a decode step that calls them can be captured by torch.compile.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


SOURCES = ("cpu_kernels.cpp", "cpu_dots.cpp", "cpu_dots.h", "cpu_qgroup.cpp", "cpu_ops.h", "cpu_decode.cpp")
# -fopenmp: at::parallel_for is an inline OpenMP loop, serial unless we compile with it.
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """Where this machine's build of these kernel sources lives (see the module docstring)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    for part in (
        *CFLAGS,
        *LDFLAGS,
        torch.__version__,
        platform.python_version(),
        platform.machine(),
        _cpu_flags(),
    ):
        h.update(part.encode() + b"\0")
    root = os.environ.get("MIXTRAL_KERNELS_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    root_dir = Path(root) if root else Path.home() / ".cache" / "torch_extensions"
    return root_dir / f"mixtral_cpu_kernels-{h.hexdigest()[:16]}"


def _library(directory: Path) -> Path:
    return directory / f"{directory.name.replace('-', '_')}.so"


def _build() -> bool:
    directory = build_dir()
    if not (directory / "BUILT").is_file():
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{directory}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same sources: wait for it
            if not (directory / "BUILT").is_file():
                _compile(directory)
    torch.ops.load_library(str(_library(directory)))
    _register_fakes()
    return True


def _compile(directory: Path) -> None:
    """Copy the sources into `directory` and build the library there (holding the flock)."""
    from torch.utils import cpp_extension

    directory.mkdir(exist_ok=True)
    (directory / "lock").unlink(missing_ok=True)  # torch's lock, left behind by a killed build
    here = Path(__file__).parent
    for name in SOURCES:
        shutil.copyfile(here / name, directory / name)
    print(f"mixtral: building the CPU decode kernels in {directory} (once per machine and kernel "
          "version, about a minute)...", file=sys.stderr, flush=True)  # fmt: skip
    t0 = time.perf_counter()
    env_path = os.environ.get("PATH", "")
    try:
        import ninja  # the one this package depends on, whatever ninja is first on PATH

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + env_path
    except ImportError:
        pass
    try:
        cpp_extension.load(
            name=directory.name.replace("-", "_"),
            sources=[str(directory / n) for n in SOURCES if n.endswith(".cpp")],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = env_path
    (directory / "BUILT").write_text(f"{torch.__version__}\n")
    print(
        f"mixtral: built the CPU decode kernels in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def _register_fakes() -> None:
    @torch.library.register_fake("mixtral_cpu::linear")
    def _linear(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)

    @torch.library.register_fake("mixtral_cpu::dequantize")
    def _dequantize(q, scale, dtype):
        return torch.empty(q.shape, dtype=dtype, device=q.device)

    @torch.library.register_fake("mixtral_cpu::moe")
    def _moe(x, ids, weights, w1, w3, w2, s1, s3, s2):
        return torch.empty_like(x)

    @torch.library.register_fake("mixtral_cpu::qlinear")
    def _qlinear(x, q, scales, bits):
        return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)

    @torch.library.register_fake("mixtral_cpu::qmoe")
    def _qmoe(x, ids, weights, w1, w3, w2, s1, s3, s2, bits):
        return torch.empty_like(x, dtype=torch.float32)

    @torch.library.register_fake("mixtral_cpu::decode_step")
    def _decode_step(tokens, positions, rows, inv_freq, k_cache, v_cache, embedding, norm, out_w, *rest):
        L, B = k_cache.shape[0], tokens.shape[0]
        gates = rest[10]
        return embedding.new_empty(B, out_w.shape[0]), embedding.new_empty(L, B, gates[0].shape[0])

    @torch.library.register_fake("mixtral_cpu::decode_layer")
    def _decode_layer(x, slots, rows, cos, sin, k_cache, v_cache, *rest):
        return torch.empty_like(x), x.new_empty(x.shape[0], rest[7].shape[0])


def available() -> bool:
    """True once the kernels are built and loaded (builds them on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                if os.environ.get("MIXTRAL_NO_KERNELS") == "1":
                    _state["ok"] = False
                else:
                    try:
                        _state["ok"] = _build()
                    except Exception as e:  # no compiler, no ninja, unsupported platform...
                        log.warning("mixtral CPU kernels unavailable, using ATen: %s", e)
                        _state["ok"] = False
    return bool(_state["ok"])


def has_w8a16() -> bool:
    """True if int8 weights multiply 16-bit quantised activations with AVX-512 VNNI in this build.

    x is then quantised per row and per block of 256 to int16 (error at most 1/65534 of the
    block's largest |x|); MIXTRAL_NO_W8A16=1 selects the exact fp32 widening path instead.
    """
    return available() and bool(torch.ops.mixtral_cpu.has_w8a16())


def has_bf16_dot() -> bool:
    """True if bf16 weights times bf16 activations use AVX512-BF16 dot products in this build."""
    if "bf16_dot" not in _state:  # fixed at build time; asked on every bf16 Linear call
        _state["bf16_dot"] = available() and bool(torch.ops.mixtral_cpu.has_bf16_dot())
    return bool(_state["bf16_dot"])


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 or bf16 · w [N, K]ᵀ (fp32, bf16, or int8 with per-row fp32 scale [N]) → [M, N] fp32.

    bf16 x with bf16 w uses bf16 dot products (fp32 accumulation) where the CPU has them; fp32 x is
    multiplied exactly by widened weights (int8: see `has_w8a16`).
    """
    return torch.ops.mixtral_cpu.linear(x, w, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 q [..., N, K] · fp32 scale [..., N] as float32 or bfloat16 (one rounding), rows in parallel."""
    return torch.ops.mixtral_cpu.dequantize(q, scale, dtype)


def moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    s1: torch.Tensor | None = None,
    s3: torch.Tensor | None = None,
    s2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k weights[t, k] · SwiGLU_{ids[t, k]}(x[t]) for a few tokens, each expert streamed once.

    x fp32 or bf16; the result has x's dtype. bf16 x with bf16 experts computes with bf16 dot products.
    """
    return torch.ops.mixtral_cpu.moe(x, ids, weights, w1, w3, w2, s1, s3, s2)


def has_qgroup_vnni() -> bool:
    """True if group-quantized weights (`qlinear`, `qmoe`) multiply with AVX-512 VNNI in this build.

    False without the instructions or with MIXTRAL_NO_QGROUP_VNNI=1 (read once per process): a
    scalar loop then computes the same exact integer block products.
    """
    return available() and bool(torch.ops.mixtral_cpu.has_qgroup_vnni())


def qlinear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] fp32 · ŵᵀ → [M, N] fp32 for group-quantized weights (`mixtral.quant.group`).

    q: int8 [N, K] (bits=8) or packed uint8 [N, K/2] (bits=4); scales: fp16 [N, K/group]. x is
    quantized per row and block of 32 to int8 as `group.quantize_activations`; each block's integer
    dot product is exact and the scale products are summed in fp32 (`group.reference_linear`).
    """
    return torch.ops.mixtral_cpu.qlinear(x, q, scales, bits)


def qmoe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    s1: torch.Tensor,
    s3: torch.Tensor,
    s2: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Σ_k weights[t, k] · SwiGLU_{ids[t, k]}(x[t]) with group-quantized experts → [T, D] fp32.

    x fp32 [T, D]; ids [T, k] (expert indices < E); weights fp32 [T, k]; w1, w3 [E, F, D or D/2] with
    scales s1, s3 fp16 [E, F, D/group]; w2 [E, D, F or F/2] with s2 fp16 [E, D, F/group]. Each product
    as `qlinear`, the hidden silu(a)·b quantized again before w2 (`group.reference_moe`); the tokens
    are grouped by expert so each selected expert is streamed once.
    """
    return torch.ops.mixtral_cpu.qmoe(x, ids, weights, w1, w3, w2, s1, s3, s2, bits)


def decode_layer(
    x: torch.Tensor,
    slots: torch.Tensor,
    rows: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attention_norm: torch.Tensor,
    ffn_norm: torch.Tensor,
    eps: float,
    attn_w: list[torch.Tensor],
    attn_s: list[torch.Tensor | None],
    attn_kind: list[int],
    n_heads: int,
    gate: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    s1: torch.Tensor | None,
    s3: torch.Tensor | None,
    s2: torch.Tensor | None,
    moe_kind: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder block for one new token per row, fp32: (x_out [B, D], router logits [B, E]).

    x [B, D]; slots int64 [B]: the cache slot of each row's token, its position (the last slot,
    S - 1, is padding's, as `LayerCache` writes it); rows [B] the cache rows (None: row b); cos, sin
    [B, hd]; k_cache, v_cache the layer's [R, KV, S, hd]; attn_w (wq, wk, wv, wo) with scales and kinds
    (0: float or per-row int8 through `linear`, 4 / 8: group bits through `qlinear`); gate [E, D] fp32;
    the experts w1, w3, w2 (+ scales) for `moe` (moe_kind 0) or `qmoe` (4 / 8). See cpu_decode.cpp;
    `mixtral.kernels.decode` builds the arguments from a model's block.
    """
    return torch.ops.mixtral_cpu.decode_layer(
        x, slots, rows, cos, sin, k_cache, v_cache, attention_norm, ffn_norm, eps, attn_w, attn_s, attn_kind,
        n_heads, gate, w1, w3, w2, s1, s3, s2, moe_kind, top_k,
    )  # fmt: skip


def decode_step(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor | None,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    embedding: torch.Tensor,
    norm: torch.Tensor,
    out_w: torch.Tensor,
    out_s: torch.Tensor | None,
    out_kind: int,
    eps: float,
    n_heads: int,
    top_k: int,
    layers: tuple[list, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole decode step of an fp32 model, one new token per row: (logits [B, V], router logits [L, B, E]).

    tokens, positions int64 [B] (-1: padding); rows [B] cache rows (None: row b); inv_freq [hd/2] RoPE's
    inverse frequencies; k_cache, v_cache [L, R, KV, S, hd]; the embedding [V, D], final norm and
    output head (weight, scale, kind as `decode_layer`'s); `layers`: the lists attention_norms,
    ffn_norms, attn_w (4 per layer), attn_s, attn_kind, gates, w1, w3, w2, s1, s3, s2, moe_kind.
    Each block runs as `decode_layer`. See cpu_decode.cpp and `mixtral.kernels.decode.FusedStep`.
    """
    return torch.ops.mixtral_cpu.decode_step(
        tokens, positions, rows, inv_freq, k_cache, v_cache, embedding, norm, out_w, out_s, out_kind, eps,
        n_heads, top_k, *layers,
    )  # fmt: skip


def step_plan(*weights: object) -> torch.ScriptObject:
    """`decode_step`'s arguments after the cache (inv_freq through `layers`, as
    `mixtral.kernels.decode.StepArgs` holds them) taken once: a `StepPlan`. `plan.run(tokens, positions,
    rows, k_cache, v_cache)` is `decode_step` with those weights; `plan_steps` gives a decode loop's."""
    if not available():
        raise RuntimeError("the CPU kernels are not built here (see mixtral.kernels.ops.available)")
    *head, layers = weights
    return torch.classes.mixtral_cpu.StepPlan(*head, *layers)


def plan_steps(plan: torch.ScriptObject) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """`plan`'s steps for a decode loop, looked up once, each (tokens, positions, k_cache, v_cache) with
    the batch's rows the cache's: the logits [B, V] (no router logits), and the greedy next tokens [B]
    int64 (each row's first largest logit, as torch.argmax)."""
    return plan.logits, plan.greedy
