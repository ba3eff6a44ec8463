"""Draws docs/img/architecture.png: the packages of `mixtral/` and the two flows through them.

    python scripts/architecture_diagram.py [--out docs/img/architecture.png]

Boxes are packages (a dashed box is a seam, not a package); blue arrows are inference (load ->
model -> dispatch -> kernels, and a prompt's tokens through generate), orange arrows are training
(data -> train loop -> model -> checkpoint). Deterministic: the same matplotlib gives the same
bytes (no timestamp or software tag in the PNG). Edit the BOXES / ARROWS tables when a package
moves, then rerun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

INFER, TRAIN, GREY = "#1f6fb4", "#d9731a", "#6f6f6f"
FILL = {"infer": "#e3eefa", "train": "#fcebdc", "both": "#e8f3e1", "base": "#f0f0f0", "seam": "#ffffff"}
W, H = 17.4, 11.15  # canvas units
TITLE, BODY, LABEL, HEADER = 14, 11.5, 10.5, 13  # font sizes (pt), readable at GitHub page width

# Columns (x, width) and rows (y, height) of the grid the boxes sit on.
C1, C2, C3, C4 = (0.3, 3.3), (4.8, 4.3), (10.3, 2.75), (14.25, 2.85)
TOP, MID, LOW = (7.95, 1.65), (5.15, 2.05), (1.6, 2.1)

# name: (column, row, fill, title, body lines); fill says which flow a package serves.
BOXES: dict[str, tuple[tuple[float, float], tuple[float, float], str, str, list[str]]] = {
    "text": (C1, TOP, "infer", "text/", ["Tokenizer (2 backends)", "StreamDecoder", "Instruct chat format"]),
    "inference": (
        C2,
        TOP,
        "infer",
        "inference/",
        ["generate / stream / generate_ids", "one GenerationConfig", "chunked prefill, decode, sample"],
    ),
    "quant": (
        C4,
        TOP,
        "infer",
        "quant/",
        ["int8 per row, bf16,", "int4/int8 groups", "(applied from outside)"],
    ),
    "checkpoint": (
        C1,
        MID,
        "both",
        "checkpoint/",
        [
            "CheckpointReader:",
            "validate, lazy mmap reads;",
            "name table; load, save,",
            "convert, GGUF export",
        ],
    ),
    "model": (
        C2,
        MID,
        "both",
        "model/",
        [
            "Transformer: RMSNorm, RoPE, GQA",
            "KVCache, one LayerCache per layer",
            "MoE: fp32 router -> dispatcher",
            "grouped SwiGLU autograd op",
        ],
    ),
    "dispatch": (
        C3,
        MID,
        "seam",
        "MoE dispatcher",
        ["Loop, Sorted (model/)", "Auto, Kernel (kernels/)", "Offload (offload/)", "later: all-to-all"],
    ),
    "kernels": (
        C4,
        MID,
        "infer",
        "kernels/",
        ["C++ ops, built on use", "KernelLinear,", "KernelDispatch", "policy.py thresholds"],
    ),
    "data": (
        C1,
        LOW,
        "train",
        "data/",
        [
            "corpus, txt/JSONL/Parquet",
            "packing: PackedStream",
            "instruct data, mathgen",
            "tokenizer training",
        ],
    ),
    "train": (
        C2,
        LOW,
        "train",
        "train/",
        [
            "one loop: pretrain, SFT, DPO",
            "router losses, AdamW, NaN guard",
            "resumable atomic checkpoints",
            "recipes, run entry points",
        ],
    ),
    "eval": (C3, LOW, "train", "eval/", ["evaluate_lm: loss, ppl", "masked loss", "instruct accuracy"]),
    "analysis": (
        C4,
        LOW,
        "both",
        "analysis/",
        ["routing stats, report", "layer-by-layer runner", "(CheckpointReader)", "routing drift"],
    ),
}
BARS = [  # full-width bars: (y, height, title, text)
    (
        10.25,
        0.75,
        "cli/",
        "the mixtral command = python -m mixtral: one module per command; flags -> GenerationConfig, recipes",
    ),
    (
        0.15,
        0.75,
        "config.py  errors.py  atomic.py",
        "MixtralConfig + presets, typed errors (any package); atomic writes (checkpoint, data, train, analysis)",
    ),
]


def anchor(name: str, side: str, frac: float = 0.5) -> tuple[float, float]:
    """A point on a box edge: side is l/r/t/b, frac runs along the edge (left->right, bottom->top)."""
    (x, w), (y, h) = BOXES[name][:2]
    return {"l": (x, y + frac * h), "r": (x + w, y + frac * h),
            "t": (x + frac * w, y + h), "b": (x + frac * w, y)}[side]  # fmt: skip


# (from, side, frac, to, side, frac, colour, label, label offset (dx, dy), curvature)
ARROWS = [
    # inference: load -> model -> dispatch -> kernels, and a prompt's tokens 1-6
    ("checkpoint", "r", 0.55, "model", "l", 0.55, INFER, "load", (0, 0.2), 0.0),
    ("text", "r", 0.68, "inference", "l", 0.68, INFER, "1 ids", (0, 0.2), 0.0),
    ("inference", "b", 0.28, "model", "t", 0.28, INFER, "2 prefill,\ndecode", (-0.62, 0), 0.0),
    ("model", "r", 0.55, "dispatch", "l", 0.55, INFER, "3 route", (0, 0.2), 0.0),
    ("dispatch", "r", 0.55, "kernels", "l", 0.55, INFER, "4 decode", (0, 0.2), 0.0),
    ("model", "t", 0.72, "inference", "b", 0.72, INFER, "5 logits", (0.55, 0), 0.0),
    ("inference", "l", 0.3, "text", "r", 0.3, INFER, "6 text", (0, -0.2), 0.0),
    ("model", "t", 0.97, "kernels", "t", 0.12, GREY, "linears (KernelLinear)", (0.0, 0.95), -0.28),
    ("quant", "b", 0.5, "kernels", "t", 0.5, GREY, "quantized\nweights", (0.62, 0), 0.0),
    # training: data -> train loop -> model -> checkpoint
    ("data", "r", 0.55, "train", "l", 0.55, TRAIN, "a batches", (0, 0.2), 0.0),
    ("train", "t", 0.45, "model", "b", 0.45, TRAIN, "b forward,\nbackward", (-0.66, 0), 0.0),
    ("train", "t", 0.08, "checkpoint", "r", 0.15, TRAIN, "c save", (-0.45, -0.05), 0.0),
    ("train", "r", 0.55, "eval", "l", 0.55, TRAIN, "evaluate", (0, 0.2), 0.0),
]


def _box(ax, x: float, y: float, w: float, h: float, fill: str, dashed: bool = False) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                                facecolor=FILL[fill], edgecolor="#333333", linewidth=1.3,
                                linestyle="--" if dashed else "-", zorder=2))  # fmt: skip


def draw(out: Path) -> None:
    fig = Figure(figsize=(13.0, 13.0 * H / W), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, W)
    ax.set_ylim(0, H)
    ax.axis("off")

    # the two lanes, behind the boxes, with their headers and the legend
    for (y0, y1), colour in (((4.55, 10.05), "#f5f9fd"), ((1.05, 4.4), "#fffaf4")):
        ax.add_patch(FancyBboxPatch((0.15, y0), W - 0.3, y1 - y0, boxstyle="round,pad=0,rounding_size=0.15",
                                    facecolor=colour, edgecolor="none", zorder=0))  # fmt: skip
    ax.text(0.3, 9.8, "inference: load -> model -> dispatch -> kernels;  a prompt's tokens 1 -> 6",
            color=INFER, fontsize=HEADER, fontweight="bold", va="center")  # fmt: skip
    ax.text(0.3, 1.3, "training: data -> train loop -> model -> checkpoint (a -> c)",
            color=TRAIN, fontsize=HEADER, fontweight="bold", va="center")  # fmt: skip
    legend = [
        ("infer", "inference"),
        ("train", "training"),
        ("both", "both"),
        ("seam", "a seam, not a package"),
    ]
    x = 9.3
    for fill, text in legend:
        _box(ax, x, 1.17, 0.32, 0.26, fill, dashed=fill == "seam")
        ax.text(x + 0.42, 1.3, text, fontsize=BODY, va="center")
        x += 0.42 + 0.115 * len(text) + 0.35

    for (x, w), (y, h), fill, title, body in BOXES.values():
        seam = fill == "seam"
        _box(ax, x, y, w, h, fill, dashed=seam)
        ax.text(x + 0.15, y + h - 0.13, title, fontsize=TITLE, fontweight="bold",
                family="sans-serif" if seam else "monospace", va="top", zorder=3)  # fmt: skip
        ax.text(x + 0.15, y + h - 0.6, "\n".join(body), fontsize=BODY, va="top", linespacing=1.3,
                zorder=3)  # fmt: skip
    for y, h, title, text in BARS:
        _box(ax, 0.3, y, W - 0.6, h, "base")
        ax.text(0.5, y + h / 2, title, fontsize=TITLE, fontweight="bold", family="monospace", va="center",
                zorder=3)  # fmt: skip
        ax.text(0.5 + 0.155 * len(title) + 0.3, y + h / 2, text, fontsize=BODY, va="center", zorder=3)

    for src, s_side, s_frac, dst, d_side, d_frac, colour, label, (dx, dy), rad in ARROWS:
        p, q = anchor(src, s_side, s_frac), anchor(dst, d_side, d_frac)
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=17, linewidth=2.2,
                                     color=colour, connectionstyle=f"arc3,rad={rad}",
                                     shrinkA=1, shrinkB=1, zorder=4))  # fmt: skip
        ax.text((p[0] + q[0]) / 2 + dx, (p[1] + q[1]) / 2 + dy, label, fontsize=LABEL, color=colour,
                ha="center", va="center", zorder=5, fontweight="bold")  # fmt: skip

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None}, facecolor="white")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, default=root / "docs" / "img" / "architecture.png")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
