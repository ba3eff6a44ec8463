"""How unevenly expert parallelism loads its ranks, from routing traces (docs/scaling.md).

Under EP, rank j of an EP group computes every slot that the group's tokens route to its experts
[j·E/ep, (j+1)·E/ep). A step is as slow as its busiest rank, so the cost of routing skew is
max_j load_j / mean_j load_j over the ranks of a group (1.0: perfectly even). The paper (Section 5)
warns that consecutive tokens often pick the same expert: a rank's batch of contiguous text then
over-subscribes some experts. These functions measure that on traces ([L, N, k] expert ids, N tokens
in text order, as `mixtral routing --keep-traces` writes them) and make a synthetic trace with the
paper's repetition rates for shapes we cannot run.
"""

from __future__ import annotations

import numpy as np


def ep_imbalance(ids_LNk: np.ndarray, n_experts: int, ep: int, group_tokens: int) -> np.ndarray:
    """[L, G] max / mean slot load over the `ep` ranks, for G consecutive batches of `group_tokens`
    tokens (an EP group's tokens in one step: ep × tokens per rank); the trace's remainder is dropped."""
    L, N, k = ids_LNk.shape
    if n_experts % ep:
        raise ValueError(f"ep={ep} must divide the {n_experts} experts")
    G = N // group_tokens
    if G == 0:
        raise ValueError(f"the trace has {N} tokens, fewer than one group of {group_tokens}")
    owner = ids_LNk[:, : G * group_tokens].reshape(L, G, group_tokens * k) // (n_experts // ep)
    load = np.stack([(owner == j).sum(-1) for j in range(ep)], axis=-1)  # [L, G, ep]
    return load.max(-1) / load.mean(-1)


def interleave_sequences(traces: dict[str, np.ndarray], seq_len: int, seed: int = 0) -> np.ndarray:
    """A pretraining-like stream: every domain's trace cut into sequences of `seq_len` tokens, the
    sequences shuffled together (each keeps its tokens in order): [L, N', k]."""
    pieces = []
    for t in traces.values():
        n = t.shape[1] // seq_len
        pieces += [t[:, i * seq_len : (i + 1) * seq_len] for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(pieces))
    return np.concatenate([pieces[i] for i in order], axis=1)


def shuffle_tokens(ids_LNk: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same tokens in random order (one permutation for all layers): no temporal locality left."""
    return ids_LNk[:, np.random.default_rng(seed).permutation(ids_LNk.shape[1])]


def synthetic_trace(
    n_tokens: int,
    repeat_first: list[float],
    n_experts: int = 8,
    top_k: int = 2,
    skew: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """[L, N, k] ids with layer l's first choice repeating the previous token's with probability
    `repeat_first[l]` (the paper's Table 5 rate, random routing included) and otherwise drawn from a
    per-layer expert distribution whose shares vary by ±`skew` around 1/E; the other choices drawn
    without replacement from the rest by the same shares."""
    rng = np.random.default_rng(seed)
    L = len(repeat_first)
    out = np.empty((L, n_tokens, top_k), dtype=np.int64)
    for layer, p_same in enumerate(repeat_first):
        shares = 1.0 + skew * rng.uniform(-1, 1, n_experts)
        shares /= shares.sum()
        # P(same) = rho + (1 - rho) * sum(p^2): the stickiness rho that gives the target rate
        rho = max(0.0, (p_same - float((shares**2).sum())) / (1 - float((shares**2).sum())))
        fresh = rng.choice(n_experts, size=n_tokens, p=shares)
        keep = rng.random(n_tokens) < rho
        first = fresh.copy()
        for t in range(1, n_tokens):
            if keep[t]:
                first[t] = first[t - 1]
        out[layer, :, 0] = first
        for j in range(1, top_k):
            w = np.tile(shares, (n_tokens, 1))
            for prev in range(j):
                w[np.arange(n_tokens), out[layer, :, prev]] = 0.0
            w /= w.sum(1, keepdims=True)
            u = rng.random((n_tokens, 1))
            out[layer, :, j] = np.minimum((w.cumsum(1) < u).sum(1), n_experts - 1)
    return out


def first_choice_repetition(ids_LNk: np.ndarray) -> np.ndarray:
    """[L] share of consecutive tokens with the same first choice (the paper's Table 5 measure)."""
    first = ids_LNk[..., 0]
    return (first[:, 1:] == first[:, :-1]).mean(axis=1)
