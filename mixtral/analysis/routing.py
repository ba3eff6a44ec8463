"""Runs a model over domain-labelled text and reduces its routing decisions (paper Section 5).

`analyze_routing(model, {domain: TokenizedDocs})` streams each domain through the model in packed
sequences (documents never attend to each other; pairs across a boundary are not counted), feeds
every batch's router logits to `RoutingStats`, records a few coloured-token samples, and returns a
`RoutingAnalysis` whose `to_json()` holds every number the report shows. Nothing per token is kept
unless `keep_traces=True`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mixtral.analysis.layerwise import LayerwiseModel
from mixtral.analysis.routing_stats import RoutingStats, Specialisation, random_baselines
from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.eval.mode import eval_mode
from mixtral.model import route
from mixtral.text import StreamDecoder, Tokenizer


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layer selection: "0,mid,last" (default), "all", or integers (negative counts from the end)."""
    if spec is None:
        spec = "first,mid,last"
    items = spec.split(",") if isinstance(spec, str) else [str(i) for i in spec]
    named = {"first": 0, "mid": (n_layers - 1) // 2, "middle": (n_layers - 1) // 2, "last": n_layers - 1}
    out: list[int] = []
    for item in (i.strip() for i in items if i.strip()):
        if item == "all":
            out.extend(range(n_layers))
            continue
        if item in named:
            out.append(named[item])
            continue
        try:
            layer = int(item)
        except ValueError:
            raise ValueError(f"bad layer {item!r}: use integers, first, mid, last or all") from None
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(layer % n_layers)
    if not out:
        raise ValueError("no layers selected")
    return sorted(set(out))


@dataclass
class TokenSample:
    """One text span with its routing: `experts[l][t]` are token t's top-k ids at layer l (first
    choice first) and `weights[l][t]` their routing weights."""

    domain: str
    pieces: list[str]
    token_ids: list[int]
    experts: list[list[list[int]]]
    weights: list[list[list[float]]]


@dataclass
class RoutingAnalysis:
    """Everything the report shows; `to_json()` is the `report.json` payload."""

    model: dict
    layers: list[int]
    stats: RoutingStats
    specialisation: Specialisation
    samples: list[TokenSample]
    timing: dict
    traces: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> [L, N, k] top-k ids, if kept

    @property
    def domains(self) -> list[str]:
        return self.stats.domains

    def to_json(self) -> dict:
        s = self.stats
        shares = s.shares()
        rep = s.repetition()
        routed, rand = s.cache_hit_rates(), s.cache_hit_rates(random=True)
        sp = self.specialisation
        pooled = {k: (v * s.tokens[:, None, None]).sum(0) / max(1, s.tokens.sum()) for k, v in shares.items()}
        present = [d for d, n in zip(s.domains, s.tokens, strict=True) if n > 0]  # the rows of sp.per_domain
        return {
            "model": self.model,
            "n_layers": s.n_layers,
            "n_experts": s.n_experts,
            "top_k": s.top_k,
            "layers": self.layers,
            "domains": s.domains,
            "tokens": {d: int(n) for d, n in zip(s.domains, s.tokens, strict=True)},
            "pairs": {d: int(n) for d, n in zip(s.domains, s.pairs, strict=True)},
            "baselines": random_baselines(s.n_experts, s.top_k),
            "expert_share": {
                d: {kind: v[i].tolist() for kind, v in shares.items()} for i, d in enumerate(s.domains)
            },
            "expert_share_all": {kind: v.tolist() for kind, v in pooled.items()},
            "specialisation": {
                "measure": "generalised Jensen-Shannon divergence (bits) between domains' 'either' shares",
                "js_bits": sp.js.tolist(),
                "ci95": [sp.ci_low.tolist(), sp.ci_high.tolist()],
                "null_mean": sp.null_mean.tolist(),
                "null_p95": sp.null_p95.tolist(),
                "p_value": sp.p_value.tolist(),
                "per_domain_js_bits": {
                    d: row.tolist() for d, row in zip(present, sp.per_domain, strict=True)
                },
            },
            "repetition": {
                d: {
                    "same_first": rep["same_first"][i].tolist(),
                    "topk_overlap": rep["topk_overlap"][i].tolist(),
                    # what independent tokens would give with this domain's (unbalanced) first-choice shares
                    "same_first_independent": (shares["first"][i] ** 2).sum(-1).tolist(),
                }
                for i, d in enumerate(s.domains)
            },
            "token_vs_domain": s.token_vs_domain() if s.token_expert is not None else None,
            "cache": {
                "sizes": list(range(1, s.n_experts + 1)),
                "routed": {d: routed[i].tolist() for i, d in enumerate(s.domains)},
                "random": {d: rand[i].tolist() for i, d in enumerate(s.domains)},
            },
            "samples": [vars(x) for x in self.samples],
            "timing": self.timing,
        }


def _token_pieces(tok: Tokenizer | None, ids: Sequence[int]) -> list[str]:
    """Display text per token: a token that completes no character (a partial UTF-8 byte) shows ""."""
    if tok is None:
        return [f"[{i}]" for i in ids]
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    pieces[-1] += dec.flush()
    return pieces


def _sample_batches(data: Mapping[str, TokenizedDocs], n: int, length: int) -> list[tuple[str, torch.Tensor]]:
    """The first `length` tokens (after BOS) of each domain's first `n` documents, one row each."""
    out = []
    for domain, docs in data.items():
        for i in range(min(n, len(docs))):
            ids = docs.doc(i)[1 : length + 1].astype(np.int64)
            if len(ids):
                out.append((domain, torch.from_numpy(ids)[None]))
    return out


def analysis_batches(
    data: Mapping[str, TokenizedDocs], budget: Mapping[str, int], seq_len: int, batch_size: int
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(domain, tokens, positions) of every packed batch, the last one cut to the token budget."""
    out = []
    for domain, docs in data.items():
        left = budget[domain]
        for batch in PackedStream({domain: docs}, seq_len, shuffle=False, loop=False).batches(batch_size):
            if left <= 0:
                break
            rows = min(batch.inputs.shape[0], math.ceil(left / seq_len))
            out.append((domain, batch.inputs[:rows], batch.positions[:rows]))
            left -= int((batch.positions[:rows] >= 0).sum())
    return out


def _route_all(
    model: nn.Module | LayerwiseModel, batches: list[tuple[torch.Tensor, torch.Tensor]], bar: tqdm
) -> Iterator[torch.Tensor]:
    """Router logits [L, B, T, E] of each (tokens, positions) batch, in order."""
    if isinstance(model, LayerwiseModel):  # its own bar counts layers; every token is done at the end
        routers = model.router_logits(batches, progress=not bar.disable)
        bar.update(bar.total - bar.n)
        yield from routers
        return
    device = next(model.parameters()).device  # batches are built on the CPU; statistics read CPU logits
    with torch.inference_mode():
        for tokens, positions in batches:
            yield model(tokens.to(device), positions=positions.to(device), keep_logits=1).router_logits.cpu()
            bar.update(int((positions >= 0).sum()))


def _sample(
    domain: str, ids: list[int], router_LTE: torch.Tensor, top_k: int, tok: Tokenizer | None
) -> TokenSample:
    weights, experts = route(router_LTE, top_k)
    rounded = [[[round(w, 4) for w in t] for t in layer] for layer in weights.tolist()]
    return TokenSample(domain, _token_pieces(tok, ids), ids, experts.tolist(), rounded)


def analyze_routing(
    model: nn.Module | LayerwiseModel,
    data: Mapping[str, TokenizedDocs],
    tokenizer: Tokenizer | None = None,
    *,
    layers: str | Sequence[int] | None = None,
    max_tokens: int | None = 100_000,
    seq_len: int = 512,
    batch_size: int = 8,
    samples_per_domain: int = 1,
    sample_tokens: int = 80,
    n_resamples: int = 200,
    keep_traces: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> RoutingAnalysis:
    """Routing statistics of `model` over each domain's documents (at most `max_tokens` per domain).

    `data` maps domain names to tokenized documents (BOS ... EOS each, see `tokenize_documents`).
    `layers` only selects what the report highlights; every layer is measured. `model` is a
    `Transformer`, or a `LayerwiseModel` for checkpoints larger than memory (then the batches go
    through one layer at a time).
    """
    cfg = model.config
    if len(data) < 2:
        raise ValueError(f"routing analysis compares domains: give at least two, got {list(data)}")
    if not 2 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} must be in [2, max_seq_len={cfg.max_seq_len}]")
    for name, value, low in (("batch_size", batch_size, 1), ("n_resamples", n_resamples, 1),
                             ("samples_per_domain", samples_per_domain, 0), ("sample_tokens", sample_tokens, 1)):  # fmt: skip
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens {max_tokens} is less than one sequence ({seq_len} tokens)")
    chosen = parse_layers(layers, cfg.n_layers)
    stats = RoutingStats(cfg.n_layers, cfg.n_experts, cfg.top_k, list(data), vocab_size=cfg.vocab_size)
    budget = {
        d: docs.n_tokens if max_tokens is None else min(max_tokens, docs.n_tokens) for d, docs in data.items()
    }
    work = analysis_batches(data, budget, seq_len, batch_size)
    sample_rows = _sample_batches(data, samples_per_domain, sample_tokens)
    batches = [(x, p) for _, x, p in work] + [(x, torch.arange(x.shape[1])[None]) for _, x in sample_rows]
    traces: dict[str, list[np.ndarray]] = {d: [] for d in data}
    samples: list[TokenSample] = []
    t_start = time.perf_counter()
    # The bar counts every real token routed: the budget's batches (the last one whole) and the samples.
    total = sum(int((positions >= 0).sum()) for _, positions in batches)
    bar = tqdm(total=total, unit="tok", desc="routing", disable=not progress, dynamic_ncols=True)
    with bar, eval_mode(model):
        for i, router in enumerate(_route_all(model, batches, bar)):
            if i < len(work):
                domain, tokens, positions = work[i]
                stats.update(domain, router, positions, tokens)
                if keep_traces:
                    ids = torch.topk(router, cfg.top_k, dim=-1).indices[:, positions >= 0]
                    traces[domain].append(
                        ids.to(torch.uint8 if cfg.n_experts <= 256 else torch.int16).numpy()
                    )
            else:
                domain, ids = sample_rows[i - len(work)]
                samples.append(_sample(domain, ids[0].tolist(), router[:, 0], cfg.top_k, tokenizer))
        forward_s = time.perf_counter() - t_start
        spec = stats.specialisation(n_resamples, seed)
    total_s = time.perf_counter() - t_start
    n_tokens = int(stats.tokens.sum())
    timing = {"tokens": n_tokens, "seconds": round(total_s, 3), "forward_and_stats_seconds": round(forward_s, 3),
              "tokens_per_s": round(n_tokens / max(total_s, 1e-9), 1), "seq_len": seq_len, "batch_size": batch_size}  # fmt: skip
    info = {"n_layers": cfg.n_layers, "n_experts": cfg.n_experts, "top_k": cfg.top_k, "dim": cfg.dim,
            "total_params": cfg.total_params, "active_params": cfg.active_params}  # fmt: skip
    kept = {d: np.concatenate(v, axis=1) for d, v in traces.items() if v}
    return RoutingAnalysis(info, chosen, stats, spec, samples, timing, kept)
