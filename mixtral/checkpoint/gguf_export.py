"""GGUF export: write a checkpoint as a llama.cpp model file (architecture "llama" with MoE tensors).

Reference: llama.cpp's convert_hf_to_gguf.py, class LlamaModel (registered for MixtralForCausalLM),
and the `gguf` package's constants. What it writes, and why:
- Tensors: `blk.{i}.ffn_{gate,up,down}_exps.weight` stacked [E, F, D] / [E, D, F] exactly like our
  experts (GGUF lists dims innermost first, so llama.cpp sees {D, F, E}); the router
  `ffn_gate_inp` [E, D]; attention, norms, `token_embd`, `output_norm`, `output`.
- q/k rows: llama.cpp's "llama" arch applies RoPE in NORM mode, which rotates interleaved pairs
  (2k, 2k+1), the Meta/Mistral layout. Our rows use HF's rotate-half layout, so wq/wk rows are
  permuted with `mixtral.checkpoint.table.to_interleaved` (the same permutation as convert_hf_to_gguf's
  `LlamaModel.permute`); every other tensor is copied as is.
- Types: norms (1-D) and the router always F32, everything else `outtype`, except that with Q8_0 or
  Q4_0 the token embedding stays F32 (our quantized models keep it float: a lookup reads one row per
  token). A Q8_0/Q4_0 row must be a multiple of 32 values; a tensor whose rows are not falls back to
  F16, as convert_hf_to_gguf does.
- Quantized sources (`mixtral quantize` checkpoints with groups of 32): the stored int4/int8 values
  and fp16 scales are copied into Q4_0/Q8_0 blocks without re-quantizing (our group-32 format is
  ggml's block with the scale kept apart), matrices the checkpoint keeps float are written F32:
  llama.cpp then multiplies exactly the weights we do. Float sources exported as q4_0/q8_0 are
  quantized by gguf-py's port of ggml's reference quantizer, which gives the same bytes as ours.
- Metadata: the keys convert_hf_to_gguf writes for Mixtral, plus the SentencePiece vocabulary
  (tokenizer model "llama": pieces, scores, token types including byte tokens, BOS/EOS/UNK,
  add_bos_token true) and the Mixtral-Instruct `tokenizer.chat_template`.
The source is read one parameter at a time (experts gathered into their stack) through
`CheckpointReader`, validated as for loading, and the file is written atomically (`mixtral.atomic`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from tqdm.auto import tqdm

try:
    import gguf
except ModuleNotFoundError as e:  # an optional extra
    raise ModuleNotFoundError("GGUF export needs the gguf package: pip install 'mixtral[gguf]'") from e

from mixtral.atomic import atomic_file
from mixtral.checkpoint.quantized import QuantizedReader, QuantLayout, quant_layout
from mixtral.checkpoint.reader import CheckpointReader, read_config
from mixtral.checkpoint.table import our_shapes, to_interleaved
from mixtral.config import MixtralConfig
from mixtral.errors import ConfigError, TokenizerError
from mixtral.text.chat_template import CHAT_TEMPLATE
from mixtral.text.tokenizer import load_tokenizer

QT = gguf.GGMLQuantizationType
T = gguf.MODEL_TENSOR
OUTTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_QUANTIZED = (QT.Q8_0, QT.Q4_0)
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"
# llama.cpp's limits (src/llama-hparams.h of the build llama-cpp-python 0.3.36 vendors; older builds
# allow 160-512 experts). It reads expert_count <= 1 as a dense model.
LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS = 512, 1024

# Our parameter names -> GGUF tensors (our_shapes order is file order).
GGUF_NAMES: dict[str, T] = {
    "tok_embeddings.weight": T.TOKEN_EMBD,
    "layers.{i}.attention_norm.weight": T.ATTN_NORM,
    "layers.{i}.attention.wq.weight": T.ATTN_Q,
    "layers.{i}.attention.wk.weight": T.ATTN_K,
    "layers.{i}.attention.wv.weight": T.ATTN_V,
    "layers.{i}.attention.wo.weight": T.ATTN_OUT,
    "layers.{i}.ffn_norm.weight": T.FFN_NORM,
    "layers.{i}.feed_forward.gate.weight": T.FFN_GATE_INP,
    "layers.{i}.feed_forward.experts.w1": T.FFN_GATE_EXP,
    "layers.{i}.feed_forward.experts.w3": T.FFN_UP_EXP,
    "layers.{i}.feed_forward.experts.w2": T.FFN_DOWN_EXP,
    "norm.weight": T.OUTPUT_NORM,
    "output.weight": T.OUTPUT,
}
_ROPE = {T.ATTN_Q: "n_heads", T.ATTN_K: "n_kv_heads"}  # rows to make interleaved, per this many heads
_ALWAYS_F32 = (T.FFN_GATE_INP,)  # convert_hf_to_gguf keeps the MoE router in F32 for every outtype


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, our parameter, numpy-order shape and stored type."""

    name: str
    ours: str
    shape: tuple[int, ...]
    qtype: QT
    rope_heads: int | None = None  # rows to permute from rotate-half to interleaved pairs

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def gguf_tensor_specs(
    cfg: MixtralConfig, outtype: str = "f32", layout: QuantLayout | None = None
) -> list[TensorSpec]:
    """Every tensor the GGUF file holds for this config, in file order (our table's order).

    `layout`: that of a quantized source, whose quantized matrices keep their blocks and whose float
    matrices are written F32."""
    qtype = _outtype(outtype)[0]
    specs = []
    for ours, shape in our_shapes(cfg).items():
        layer = ours.split(".")[1] if ours.startswith("layers.") else None
        kind = GGUF_NAMES[ours.replace(f"layers.{layer}.", "layers.{i}.") if layer else ours]
        name = gguf.TENSOR_NAMES[kind].format(bid=layer) + ".weight"
        if len(shape) == 1 or kind in _ALWAYS_F32:
            t = QT.F32
        elif layout is not None:
            t = qtype if layout.quantizes(ours) else QT.F32
        elif qtype in _QUANTIZED and kind == T.TOKEN_EMBD:
            t = QT.F32
        elif qtype in _QUANTIZED and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            t = QT.F16  # rows that do not fill Q8_0/Q4_0 blocks: convert_hf_to_gguf's fallback
        else:
            t = qtype
        rope = getattr(cfg, _ROPE[kind]) if kind in _ROPE else None
        specs.append(TensorSpec(name, ours, shape, t, rope))
    return specs


def export_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    outtype: str | None = None,
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write checkpoint directory `src` (HF or Mistral format) as the GGUF file `dst`; returns `dst`.

    `outtype`: "f32", "f16", "q8_0" or "q4_0" for the matrices (norms and router stay F32); None:
    f32, or for a quantized source the type of its blocks (q4_0 for int4, q8_0 for int8). `tokenizer`: a
    SentencePiece model file or a directory holding one; None uses the one in `src`. Memory is
    about one parameter (one layer's stacked experts) beyond the output buffers. Raises
    FileNotFoundError (no `src`), FileExistsError (`dst` exists, overwrite False), ValueError
    (unknown outtype), ConfigError (a config llama.cpp cannot load), TokenizerError, and the
    loader's typed CheckpointErrors; a failed export leaves no file behind.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    layout = quant_layout(src)
    if layout is not None:
        if layout.group != 32:
            raise ConfigError(
                f"{src} is quantized {layout.storage}; GGUF's Q4_0/Q8_0 blocks hold 32 values per scale, so "
                "only a checkpoint quantized with --group 32 exports as its own blocks (export the float "
                "checkpoint with --outtype q4_0 or q8_0 instead)"
            )
        native = "q4_0" if layout.bits == 4 else "q8_0"
        if outtype not in (None, native):
            raise ConfigError(
                f"{src} holds {layout.storage} weights, which export as {native}, not {outtype}"
            )
        outtype = native
    outtype = outtype or "f32"
    ftype = _outtype(outtype)[1]
    if dst.is_dir():
        raise IsADirectoryError(f"{dst} is a directory; pass the path of the .gguf file to write")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    if dst.exists() and dst.suffix != ".gguf":
        raise FileExistsError(
            f"{dst} exists and is not a .gguf file; refusing to replace it with a GGUF export"
        )
    cfg, _ = read_config(src)
    check_representable(cfg)
    vocab = _vocab(tokenizer if tokenizer is not None else src, cfg.vocab_size)
    specs = gguf_tensor_specs(cfg, outtype, layout)
    # Every header check the loader runs, before writing anything.
    opened = QuantizedReader(src) if layout is not None else CheckpointReader(src)
    with opened as reader, atomic_file(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_hparams(writer, cfg, ftype, name=src.resolve().name)
            _add_vocab(writer, *vocab)
            for spec in specs:  # all headers first; the data then streams in the same order
                writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, spec.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for spec in tqdm(specs, desc=f"GGUF {outtype}", unit="tensor", disable=not progress):
                if layout is not None:
                    writer.write_tensor_data(_stored(reader, spec, layout, cfg.n_experts))
                    continue
                w = reader.read(spec.ours, dtype=torch.float32)
                if spec.rope_heads:
                    w = to_interleaved(w, spec.rope_heads)
                writer.write_tensor_data(_encode(w.numpy(), spec))
        finally:
            writer.close()
    return dst


def check_representable(cfg: MixtralConfig) -> None:
    """Raise ConfigError if llama.cpp's "llama" architecture cannot load this config as a MoE."""
    if cfg.n_experts < 2:
        raise ConfigError(
            f"config field 'n_experts' is {cfg.n_experts}: llama.cpp reads expert_count <= 1 as a dense "
            "model, so a one-expert MoE cannot be exported to GGUF"
        )
    if cfg.n_experts > LLAMA_MAX_EXPERTS:
        raise ConfigError(
            f"config field 'n_experts' ({cfg.n_experts}) exceeds llama.cpp's {LLAMA_MAX_EXPERTS}"
        )
    if cfg.n_layers > LLAMA_MAX_LAYERS:
        raise ConfigError(f"config field 'n_layers' ({cfg.n_layers}) exceeds llama.cpp's {LLAMA_MAX_LAYERS}")


# ---- pieces ---------------------------------------------------------------------------------------


def _outtype(outtype: str) -> tuple[QT, gguf.LlamaFileType]:
    if outtype not in OUTTYPES:
        raise ValueError(f"unsupported GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype]


def _add_hparams(writer: gguf.GGUFWriter, cfg: MixtralConfig, ftype: gguf.LlamaFileType, name: str) -> None:
    """The keys convert_hf_to_gguf writes for MixtralForCausalLM (TextModel + LlamaModel)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_expert_count(cfg.n_experts)
    writer.add_expert_used_count(cfg.top_k)
    # Written always (convert_hf_to_gguf does whenever config.json has head_dim, as ours does), so
    # a head_dim other than dim / n_heads needs no special case.
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_file_type(ftype)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(
    source: str | os.PathLike[str], vocab_size: int
) -> tuple[list[bytes], list[float], list[int], dict[str, int]]:
    """Pieces, scores, token types and special ids of a SentencePiece model, padded to `vocab_size`."""
    tok = load_tokenizer(source)
    if tok.kind != "sentencepiece":
        raise TokenizerError(
            f"GGUF export needs a SentencePiece tokenizer.model, but {tok.source} is a tokenizer.json; "
            "pass tokenizer= the .model file"
        )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok.source))
    n = sp.vocab_size()
    if n > vocab_size:
        raise TokenizerError(f"{tok.source} has {n} tokens, more than the model's vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(_token_type(sp, i))
    for i in range(n, vocab_size):  # embedding rows without a piece, as convert_hf_to_gguf pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = {"bos": tok.bos_id, "eos": tok.eos_id}
    if sp.unk_id() >= 0:
        special["unk"] = sp.unk_id()
    if tok.pad_id is not None:
        special["pad"] = tok.pad_id
    return tokens, scores, types, special


def _add_vocab(
    writer: gguf.GGUFWriter,
    tokens: list[bytes],
    scores: list[float],
    types: list[int],
    special: dict[str, int],
) -> None:
    """The SentencePiece ("llama") vocabulary keys, as convert_hf_to_gguf's _set_vocab_sentencepiece."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for key, value in special.items():
        getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _token_type(sp: sentencepiece.SentencePieceProcessor, i: int) -> int:
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _encode(w: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The tensor's bytes in its stored type (Q8_0: gguf's port of ggml's reference quantizer)."""
    data = gguf.quants.quantize(w, spec.qtype)
    if spec.qtype == QT.F16 and not np.isfinite(data).all():
        raise ValueError(f"{spec.ours} overflows float16 (|w| max {np.abs(w).max():.3g}); export f32 or q8_0")
    return data


def _blocks(q: torch.Tensor, scales: torch.Tensor, bits: int) -> np.ndarray:
    """ggml Q4_0/Q8_0 blocks (fp16 scale, then the 16 or 32 quant bytes) of our group-32 rows [N, ...]."""
    n, nb = scales.shape
    qb = q.contiguous().view(torch.uint8).reshape(n, nb, 16 if bits == 4 else 32)
    sb = scales.contiguous().view(torch.uint8).reshape(n, nb, 2)
    return torch.cat([sb, qb], dim=-1).reshape(n, -1).numpy()


def _stored(reader: QuantizedReader, spec: TensorSpec, layout: QuantLayout, n_experts: int) -> np.ndarray:
    """One GGUF tensor from a quantized checkpoint: its blocks as stored, or its float values as F32."""
    if not layout.quantizes(spec.ours):
        w = reader.read(spec.ours).float()
        return (to_interleaved(w, spec.rope_heads) if spec.rope_heads else w).numpy()
    if ".experts." in spec.ours:  # stacked [E, N, row bytes], one expert at a time
        layer = int(spec.ours.split(".")[1])
        part = spec.ours.rsplit(".", 1)[1]
        out = []
        for e in range(n_experts):
            t = reader.read_expert(layer, e)
            out.append(_blocks(t[f"q{part}"], t[f"s{part}"], layout.bits))
        return np.stack(out)
    base = spec.ours.removesuffix(".weight")
    q, s = reader.read(f"{base}.qweight"), reader.read(f"{base}.scales")
    if spec.rope_heads:
        q, s = to_interleaved(q, spec.rope_heads), to_interleaved(s, spec.rope_heads)
    return _blocks(q, s, layout.bits)
