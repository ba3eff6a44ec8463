"""A routing report's per-layer numbers as a plain-text table (for the terminal)."""

from __future__ import annotations

import numpy as np


def print_summary(r: dict) -> None:
    """Per analysed layer: specialisation (JS) against its null, repetition and LRU hit rate against
    random routing (token-weighted over domains), and token-vs-domain identity."""
    base, sp = r["baselines"], r["specialisation"]
    tokens = np.array([r["tokens"][d] for d in r["domains"]], dtype=float)
    w = tokens / tokens.sum()
    k = r["top_k"]

    def mean(per_domain) -> float:  # token-weighted over domains
        return float(sum(wi * per_domain(d) for wi, d in zip(w, r["domains"], strict=True)))

    print(f"{int(tokens.sum()):,} tokens over {len(r['domains'])} domains; E={r['n_experts']}, top-{k}")
    print(f"{'layer':>5} {'JS bits':>8} {'null p95':>9} {'same 1st':>9} {'(random)':>9} {'top-k ovl':>9} "
          f"{'(random)':>9} {'LRU hit c=' + str(k):>12} {'(random)':>9} {'token/domain':>13}")  # fmt: skip
    for layer in r["layers"]:
        same = mean(lambda d, i=layer: r["repetition"][d]["same_first"][i])
        ovl = mean(lambda d, i=layer: r["repetition"][d]["topk_overlap"][i])
        hit = mean(lambda d, i=layer: r["cache"]["routed"][d][i][k - 1])
        rnd = mean(lambda d, i=layer: r["cache"]["random"][d][i][k - 1])
        tvd = r.get("token_vs_domain")
        identity = f"{tvd['token_modal'][layer]:.0%}/{tvd['domain_modal'][layer]:.0%}" if tvd else "n/a"
        print(f"{layer:>5} {sp['js_bits'][layer]:>8.4f} {sp['null_p95'][layer]:>9.4f} {same:>9.1%} "
              f"{base['same_first']:>9.1%} {ovl:>9.1%} {base['topk_overlap']:>9.1%} {hit:>12.1%} {rnd:>9.1%} "
              f"{identity:>13}")  # fmt: skip
    print(
        "token/domain: share of tokens whose first choice is the one their token id usually gets / "
        "the one their domain usually gets"
    )
