"""Streaming statistics of top-k routing decisions (paper Section 5), reduced on the fly.

Input is what every forward pass returns: router logits `[L, B, T, E]`, plus the token positions
that say which tokens are real and which neighbours belong to the same document. Nothing per token
is kept unless asked; memory is O(domains · L · E) plus one `[L, E]` count row per sequence (for
the bootstrap), whatever the number of tokens.

Definitions (E experts, top-k routing, choices ordered by decreasing router logit, as in
`moe.route`):
- share "first" / "second": fraction of a domain's tokens whose 1st (2nd) choice is expert e;
  share "either": fraction of all k·N assignments that go to e. Each sums to 1 over experts, so
  uniform routing gives 1/E for all three (the paper's Figure 7 line).
- repetition (Table 5): over pairs (i, i+1) of consecutive tokens of the same document, the share
  with the same first choice, and with overlapping top-k sets. Random baselines: 1/E and
  1 - C(E-k, k) / C(E, k). With unbalanced experts, independent tokens already repeat their first
  choice with probability sum_e share_first(e)^2 (`same_first_independent` in the report): the
  part of the repetition that imbalance alone explains.
- specialisation: generalised Jensen-Shannon divergence (bits, equal domain weights) between the
  domains' "either" distributions, per layer: H(mean_d P_d) - mean_d H(P_d). 0 = identical routing;
  1 bit = disjoint for two domains. Its sampling noise is measured by a sequence-level bootstrap
  (interval) and by a permutation null (domain labels shuffled across sequences).
- token identity vs domain ("routing follows syntax", paper Figure 8, as a number): per layer, the
  share of tokens whose first choice is the one their token id most often gets, against the share
  whose first choice is the one their domain most often gets. Needs the token ids (`tokens_BT`);
  memory L · vocab · E counters (int32).
- expert cache: hit rate of a per-layer LRU cache of c = 1..E experts while each sequence is
  decoded token by token. A token's k experts are looked up in the cache as it was before that
  token, then become the most recently used (first choice most recent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def random_baselines(n_experts: int, top_k: int) -> dict[str, float]:
    """What independent uniform routing gives: share 1/E, same first 1/E, top-k overlap."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}")
    no_overlap = math.comb(n_experts - top_k, top_k) / math.comb(n_experts, top_k)
    return {"share": 1 / n_experts, "same_first": 1 / n_experts, "topk_overlap": 1 - no_overlap}


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy over the last axis, in bits (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(-1)


def js_divergence(p_DE: np.ndarray) -> np.ndarray:
    """Generalised JS divergence in bits between D distributions (equal weights): `[..., D, E] -> [...]`."""
    p = p_DE / p_DE.sum(-1, keepdims=True)
    return entropy_bits(p.mean(-2)) - entropy_bits(p).mean(-1)


def _normalise(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts, dtype=np.float64), where=total > 0)


@dataclass
class Specialisation:
    """Per layer: observed JS (bits), its bootstrap interval and the permutation-null distribution."""

    js: np.ndarray  # [L]
    ci_low: np.ndarray  # [L], 2.5th bootstrap percentile
    ci_high: np.ndarray  # [L], 97.5th
    null_mean: np.ndarray  # [L], JS expected from sampling alone
    null_p95: np.ndarray  # [L]
    p_value: np.ndarray  # [L], share of permutations with JS >= observed (add-one)
    per_domain: np.ndarray  # [D, L], JS(P_d, mixture of all domains) for two equal-weight distributions


def specialisation(
    seq_counts_SLE: np.ndarray,
    seq_domain_S: np.ndarray,
    n_domains: int,
    n_resamples: int = 200,
    seed: int = 0,
) -> Specialisation:
    """JS between domains from per-sequence expert counts, with bootstrap and permutation null."""
    rng = np.random.default_rng(seed)
    S, L, E = seq_counts_SLE.shape
    flat = seq_counts_SLE.reshape(S, L * E).astype(np.float64)
    onehot_SD = np.zeros((S, n_domains))
    onehot_SD[np.arange(S), seq_domain_S] = 1.0
    counts_DLE = (onehot_SD.T @ flat).reshape(n_domains, L, E)
    present = counts_DLE.sum((1, 2)) > 0
    p_LDE = _normalise(counts_DLE[present]).transpose(1, 0, 2)
    js = js_divergence(p_LDE)
    mixture_LE = p_LDE.mean(1)
    per_domain = np.stack(
        [js_divergence(np.stack([p_LDE[:, d], mixture_LE], 1)) for d in range(p_LDE.shape[1])]
    )
    boot = np.empty((n_resamples, L))
    null = np.empty((n_resamples, L))
    members = [np.flatnonzero(seq_domain_S == d) for d in np.flatnonzero(present)]
    for r in range(n_resamples):
        resampled = np.stack([flat[rng.choice(m, size=len(m))].sum(0) for m in members])  # [D', L*E]
        boot[r] = js_divergence(_normalise(resampled.reshape(-1, L, E)).transpose(1, 0, 2))
        shuffled = onehot_SD[rng.permutation(S)][:, present]
        null[r] = js_divergence(_normalise((shuffled.T @ flat).reshape(-1, L, E)).transpose(1, 0, 2))
    return Specialisation(
        js=js,
        ci_low=np.percentile(boot, 2.5, axis=0),
        ci_high=np.percentile(boot, 97.5, axis=0),
        null_mean=null.mean(0),
        null_p95=np.percentile(null, 95, axis=0),
        p_value=((null >= js).sum(0) + 1) / (n_resamples + 1),
        per_domain=per_domain,
    )


def lru_hit_histogram(ids_LBTK: torch.Tensor, valid_BT: torch.Tensor, n_experts: int) -> np.ndarray:
    """Per layer, how many expert requests hit at each LRU depth: `[L, E + 1]` counts.

    Column j < E counts requests whose expert was the (j+1)-th most recently used when the token
    arrived (a hit for every cache of size > j); column E counts first-time requests. So the hits
    of a cache of size c are `hist[:, :c].sum(-1)`. Each row b is its own stream, starting cold;
    tokens where `valid_BT` is False are skipped.
    """
    L, B, T, K = ids_LBTK.shape
    E = n_experts
    # stamp of each use: later tokens larger; within a token the first choice is the most recent
    prio_K = torch.arange(K, 0, -1, dtype=torch.float32)
    stamp_LBTK = (torch.arange(T, dtype=torch.float32).view(T, 1) * (K + 1) + prio_K).expand(L, B, T, K)
    stamp_LBTK = torch.where(valid_BT[None, :, :, None], stamp_LBTK, -1.0)
    used_LBTE = torch.full((L, B, T, E), -1.0).scatter(-1, ids_LBTK, stamp_LBTK.contiguous())
    last_LBTE = torch.cummax(used_LBTE, dim=2).values  # time of last use up to and including t
    before_LBTE = torch.cat([torch.full((L, B, 1, E), -1.0), last_LBTE[:, :, :-1]], dim=2)
    key_LBTK = before_LBTE.gather(-1, ids_LBTK)
    depth_LBTK = (before_LBTE.unsqueeze(-2) > key_LBTK.unsqueeze(-1)).sum(-1)
    depth_LBTK = torch.where(key_LBTK < 0, E, depth_LBTK)  # never seen: a miss at every size
    depth_LBTK = torch.where(valid_BT[None, :, :, None], depth_LBTK, E + 1)  # padding: dropped below
    flat = (depth_LBTK.reshape(L, -1) + (torch.arange(L) * (E + 2)).view(L, 1)).flatten()
    return torch.bincount(flat, minlength=L * (E + 2)).view(L, E + 2)[:, : E + 1].numpy()


class RoutingStats:
    """Accumulates shares, repetition, per-sequence counts and LRU depths over batches of one domain each."""

    def __init__(
        self, n_layers: int, n_experts: int, top_k: int, domains: Sequence[str], vocab_size: int | None = None
    ) -> None:
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self.domains = list(domains)
        D, L, E = len(self.domains), n_layers, n_experts
        self.first = np.zeros((D, L, E), dtype=np.int64)
        self.second = np.zeros((D, L, E), dtype=np.int64)
        self.either = np.zeros((D, L, E), dtype=np.int64)
        self.tokens = np.zeros(D, dtype=np.int64)
        self.same_first = np.zeros((D, L), dtype=np.int64)
        self.overlap = np.zeros((D, L), dtype=np.int64)
        self.pairs = np.zeros(D, dtype=np.int64)
        self.lru = np.zeros((D, L, E + 1), dtype=np.int64)
        self.lru_random = np.zeros((D, L, E + 1), dtype=np.int64)
        self._seq_counts: list[np.ndarray] = []
        self._seq_domain: list[np.ndarray] = []
        self._rng = torch.Generator().manual_seed(0)
        self.vocab_size = vocab_size
        self.token_expert = np.zeros((L, vocab_size, E), dtype=np.int32) if vocab_size else None

    def update(
        self,
        domain: str,
        router_logits_LBTE: torch.Tensor,
        positions_BT: torch.Tensor,
        tokens_BT: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of `domain`. Tokens with position < 0 are padding; a pair (t, t+1) counts
        only when position t+1 == position t + 1 (same document, no boundary in between).
        `tokens_BT` (the input ids) feed the token-identity counters when `vocab_size` was given."""
        L, B, T, E = router_logits_LBTE.shape
        if (L, E) != (self.n_layers, self.n_experts):
            raise ValueError(f"router logits have {L} layers x {E} experts; stats expect "
                             f"{self.n_layers} x {self.n_experts}")  # fmt: skip
        if positions_BT.shape != (B, T):
            raise ValueError(
                f"positions {tuple(positions_BT.shape)} do not match the router logits' {(B, T)}"
            )
        d = self.domains.index(domain)
        ids_LBTK = torch.topk(router_logits_LBTE.float(), self.top_k, dim=-1).indices  # as moe.route
        self.add_ids(d, ids_LBTK, positions_BT)
        if self.token_expert is not None and tokens_BT is not None:
            V, E = self.vocab_size, self.n_experts
            real = positions_BT >= 0
            first_LN = ids_LBTK[..., 0][:, real]  # [L, N]
            key = (torch.arange(L).view(L, 1) * V + tokens_BT[real].view(1, -1)) * E + first_LN
            self.token_expert += (
                torch.bincount(key.flatten(), minlength=L * V * E).view(L, V, E).to(torch.int32).numpy()
            )

    def add_ids(self, d: int, ids_LBTK: torch.Tensor, positions_BT: torch.Tensor) -> None:
        L, B, T, K = ids_LBTK.shape
        E = self.n_experts
        valid_BT = positions_BT >= 0
        n_valid = int(valid_BT.sum())
        self.tokens[d] += n_valid
        layer_off = (torch.arange(L) * E).view(L, 1, 1)

        def count(ids_LBT: torch.Tensor) -> torch.Tensor:
            flat = (ids_LBT + layer_off)[:, valid_BT]
            return torch.bincount(flat.flatten(), minlength=L * E).view(L, E)

        self.first[d] += count(ids_LBTK[..., 0]).numpy()
        if K > 1:
            self.second[d] += count(ids_LBTK[..., 1]).numpy()
        # per sequence "either" counts, for the bootstrap: [B, L, E]
        seq_ids = (ids_LBTK + layer_off.unsqueeze(-1)).permute(1, 0, 2, 3).reshape(B, -1)
        seq_w = valid_BT.unsqueeze(1).expand(B, L, T).unsqueeze(-1).expand(B, L, T, K).reshape(B, -1)
        rows = torch.arange(B).unsqueeze(1) * (L * E)
        seq_counts = torch.bincount((seq_ids + rows).flatten(), weights=seq_w.flatten().double(),
                                    minlength=B * L * E).view(B, L, E)  # fmt: skip
        keep = valid_BT.any(1)
        self.either[d] += seq_counts.sum(0).long().numpy()
        self._seq_counts.append(seq_counts[keep].to(torch.int32).numpy())
        self._seq_domain.append(np.full(int(keep.sum()), d, dtype=np.int64))
        pair_BT = (positions_BT[:, 1:] == positions_BT[:, :-1] + 1) & (positions_BT[:, :-1] >= 0)
        self.pairs[d] += int(pair_BT.sum())
        a, b = ids_LBTK[:, :, :-1], ids_LBTK[:, :, 1:]
        same = (a[..., 0] == b[..., 0]) & pair_BT
        shared = ((a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).any(-1)) & pair_BT
        self.same_first[d] += same.sum((1, 2)).numpy()
        self.overlap[d] += shared.sum((1, 2)).numpy()
        self.lru[d] += lru_hit_histogram(ids_LBTK, valid_BT, E)
        random_ids = torch.rand(L, B, T, E, generator=self._rng).topk(K, dim=-1).indices
        self.lru_random[d] += lru_hit_histogram(random_ids, valid_BT, E)

    # results -------------------------------------------------------------------------------

    def shares(self) -> dict[str, np.ndarray]:
        """`{"first", "second", "either"}` -> `[D, L, E]` fractions (see the module docstring)."""
        out = {"first": _normalise(self.first), "either": _normalise(self.either)}
        if self.top_k > 1:
            out["second"] = _normalise(self.second)
        return out

    def repetition(self) -> dict[str, np.ndarray]:
        """`{"same_first", "topk_overlap"}` -> `[D, L]` fractions of consecutive same-document pairs."""
        pairs = np.maximum(self.pairs, 1)[:, None]
        return {"same_first": self.same_first / pairs, "topk_overlap": self.overlap / pairs}

    def cache_hit_rates(self, random: bool = False) -> np.ndarray:
        """`[D, L, E]`: hit rate of an LRU cache of 1..E experts (random=True: same streams, random routing)."""
        hist = (self.lru_random if random else self.lru).astype(np.float64)
        requests = np.maximum(hist.sum(-1, keepdims=True), 1)
        return np.cumsum(hist[..., : self.n_experts], -1) / requests

    def token_vs_domain(self, min_count: int = 20) -> dict[str, list[float] | float]:
        """Per layer: share of tokens at their token id's most frequent first choice ("token_modal"),
        the same over token ids seen at least `min_count` times ("token_modal_frequent", which are
        "frequent_share" of all tokens; rare ids are trivially consistent), and the share at their
        domain's most frequent first choice ("domain_modal")."""
        if self.token_expert is None:
            raise ValueError("token identity needs RoutingStats(vocab_size=...) and tokens in update()")
        counts = self.token_expert.astype(np.int64)  # [L, V, E]
        n = max(1, int(self.tokens.sum()))
        per_token = counts[0].sum(-1)  # [V], the same at every layer
        frequent = per_token >= min_count
        return {
            "token_modal": (counts.max(-1).sum(-1) / n).tolist(),
            "token_modal_frequent": (
                counts[:, frequent].max(-1).sum(-1) / max(1, per_token[frequent].sum())
            ).tolist(),
            "frequent_share": float(per_token[frequent].sum() / n),
            "domain_modal": (self.first.max(-1).sum(0) / n).tolist(),
        }

    def specialisation(self, n_resamples: int = 200, seed: int = 0) -> Specialisation:
        counts = (
            np.concatenate(self._seq_counts)
            if self._seq_counts
            else np.zeros((0, self.n_layers, self.n_experts))
        )
        owner = np.concatenate(self._seq_domain) if self._seq_domain else np.zeros(0, dtype=np.int64)
        if len(set(owner.tolist())) < 2:
            raise ValueError("specialisation needs at least two domains with tokens")
        return specialisation(counts, owner, len(self.domains), n_resamples, seed)
