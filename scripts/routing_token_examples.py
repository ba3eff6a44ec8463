"""Per-token routing consistency on the mini model (the examples in docs/routing/README.md, finding 2).

Runs analyze_routing with traces over 20K held-out tokens per domain and prints, per layer, the
share of tokens at their token id's / domain's usual expert and, for a few tokens, each domain's
modal expert, its share and the count:  python scripts/routing_token_examples.py
"""

import collections
import json

import numpy as np
import torch

from mixtral import load_model, load_tokenizer
from mixtral.analysis.routing import analysis_batches, analyze_routing
from mixtral.data.domains import load_domains

torch.set_num_threads(1)
m = load_model("models/mini").eval()
tok = load_tokenizer("models/mini")
data, _ = load_domains(tok, {})
N = 20000
res = analyze_routing(m, data, tok, max_tokens=N, keep_traces=True, progress=False, n_resamples=10)
budget = {d: min(N, docs.n_tokens) for d, docs in data.items()}
work = analysis_batches(data, budget, 512, 8)
ids = collections.defaultdict(list)
for d, x, p in work:
    ids[d].append(x[p >= 0].numpy())
ids = {d: np.concatenate(v) for d, v in ids.items()}
L = m.config.n_layers
out = {}
for layer in range(L):
    first = {d: res.traces[d][layer, :, 0] for d in ids}
    allt = np.concatenate([ids[d] for d in ids])
    alle = np.concatenate([first[d] for d in ids])
    alld = np.concatenate([np.full(len(ids[d]), i) for i, d in enumerate(ids)])
    # share of tokens routed to their token id's modal expert (pooled over domains)
    key = allt.astype(np.int64) * 8 + alle
    cnt = collections.Counter(key.tolist())
    best = collections.defaultdict(int)
    for k, c in cnt.items():
        best[k // 8] = max(best[k // 8], c)
    tok_modal = sum(best.values()) / len(allt)
    # share routed to the domain's modal expert
    dom_modal = sum(np.bincount(alle[alld == i], minlength=8).max() for i in range(len(ids))) / len(allt)
    # only tokens seen >= 20 times, to avoid singletons inflating token-modal share
    tcount = collections.Counter(allt.tolist())
    freq = np.array([tcount[t] >= 20 for t in allt.tolist()])
    sub = sum(v for t, v in best.items() if tcount[t] >= 20) / freq.sum()
    row = {
        "token_modal": tok_modal,
        "token_modal_frequent": sub,
        "frequent_share": float(freq.mean()),
        "domain_modal": dom_modal,
    }
    for word in ["▁the", "▁self", "▁of", "▁import", "Question", "▁de"]:
        tid = tok.encode(word.replace("▁", " ").strip(), bos=False)
        if len(tid) != 1:
            continue
        t = tid[0]
        per = {}
        for d in ids:
            sel = first[d][ids[d] == t]
            if len(sel) >= 10:
                bc = np.bincount(sel, minlength=8)
                per[d] = (int(bc.argmax()), round(float(bc.max() / bc.sum()), 2), int(bc.sum()))
        row[word] = per
    out[layer] = row
    print(layer, json.dumps(row))
