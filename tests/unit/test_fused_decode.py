"""The fused decode step (`mixtral.kernels.decode`, cpu_decode.cpp) against the blocks' Python path.

Each case decodes the same tokens twice, once with every block's `fused_decode` and once without, and
compares logits step by step (the fused step only sums norms, attention and router in another order)
and greedy tokens; then the cases where it must hand back to the Python path, and its errors.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import tiny_config

from mixtral.inference import GenerationConfig, generate_ids
from mixtral.inference.engine import Engine
from mixtral.kernels import apply_kernels, ops, policy
from mixtral.kernels.decode import FUSED_DECODE, FUSED_STEP
from mixtral.model import Transformer
from mixtral.model.cache import KVCache, LayerCache
from mixtral.model.dispatch import SortedDispatch
from mixtral.model.transformer import rope_cos_sin
from mixtral.quant import quantize_model


@pytest.fixture(autouse=True)
def _kernels(kernels_built):
    yield


def build(
    storage: str | None, targets=("experts", "attention", "output"), seed: int = 0, **changes
) -> Transformer:
    torch.manual_seed(seed)
    # dim, hidden and q_dim multiples of 32 for the group formats; random weights large enough that the
    # router's choices are not near ties.
    config = tiny_config(dim=64, hidden_dim=128, head_dim=16, n_heads=4, n_kv_heads=2, **changes)
    model = Transformer(config).eval()
    model.reset_parameters(std=0.1)
    if storage is not None:
        quantize_model(model, storage, targets)
    return apply_kernels(model)


def set_fused(model: Transformer, mode: str | None) -> None:
    """None: the modules; "block": one decode_layer call per block; "step": one decode_step per step."""
    model.fused_step = FUSED_STEP if mode == "step" else None
    for layer in model.layers:
        layer.fused_decode = FUSED_DECODE if mode is not None else None


@torch.no_grad()
def decode_logits(
    model: Transformer, prompt: torch.Tensor, steps: int, fused: str | None
) -> list[torch.Tensor]:
    """Greedy decode after a prefill; the logits of every decode step."""
    set_fused(model, fused)
    cache = KVCache.allocate(model.config, prompt.shape[0], prompt.shape[1] + steps)
    tok = model(prompt, cache, keep_logits=1).logits[:, -1].argmax(-1, keepdim=True)
    out = []
    for _ in range(steps):
        logits = model(tok, cache).logits[:, -1]
        out.append(logits)
        tok = logits.argmax(-1, keepdim=True)
    return out


@pytest.fixture
def count_calls():
    """Counts the Python-side calls of ops.decode_layer and ops.decode_step."""
    real = {name: getattr(ops, name) for name in ("decode_layer", "decode_step")}
    count = {"decode_layer": 0, "decode_step": 0}

    def counting(name):
        def call(*args):
            count[name] += 1
            return real[name](*args)

        return call

    for name in real:
        setattr(ops, name, counting(name))
    yield count
    for name, fn in real.items():
        setattr(ops, name, fn)


STORAGES = [None, "int4", "int8-g32", "int4-g64", "int8", "bf16"]  # int8: per-row scales
# Max |difference| / max |logit| allowed. Float weights: summation order only. Quantized activations
# (group formats: int8 per block of 32; per-row int8: int16 per block of 256) can round one value to
# the next step when the norm's last bit differs, a change of up to one activation quantum.
TOLERANCE = {None: 2e-5, "bf16": 2e-5, "int8": 1e-4, "int4": 1e-3, "int8-g32": 1e-3, "int4-g64": 1e-3}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["block", "step"])
def test_fused_equals_python_path(storage, batch, mode, count_calls):
    model = build(storage)
    prompt = torch.randint(0, 97, (batch, 7), generator=torch.Generator().manual_seed(batch))
    python = decode_logits(model, prompt, 12, fused=None)
    assert count_calls == {"decode_layer": 0, "decode_step": 0}
    fused = decode_logits(model, prompt, 12, fused=mode)
    # every decode step, no prefill: one call per block, or one per step
    want = {"decode_layer": 12 * model.config.n_layers, "decode_step": 0} if mode == "block" else {
        "decode_layer": 0, "decode_step": 12}  # fmt: skip
    assert count_calls == want
    for step, (a, b) in enumerate(zip(fused, python, strict=True)):
        scale = b.abs().max()
        assert (a - b).abs().max() <= TOLERANCE[storage] * scale, (
            f"step {step}: {(a - b).abs().max()} vs {scale}"
        )
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_mixed_storage_experts_only_and_longer_context(count_calls):
    """int4 experts with float attention (wq/wk/wv by `linear`, not the grouped qkv pass), past 64 slots."""
    model = build("int4", targets=("experts",), seed=3)
    prompt = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(5))
    python = decode_logits(model, prompt, 6, fused=None)
    fused = decode_logits(model, prompt, 6, fused="step")
    assert count_calls["decode_step"] == 6
    for a, b in zip(fused, python, strict=True):
        assert (a - b).abs().max() <= TOLERANCE["int4"] * b.abs().max()


@pytest.mark.parametrize(
    ("head_dim", "n_heads", "prompt_len"),
    [
        (16, 4, 9),  # vector path (AVX-512 when the CPU has it), 9..13 slots: key and exp tails
        (8, 8, 21),  # head_dim not a multiple of 16: the plain loops
        (64, 8, 2040),  # 8 heads x 2041+ slots x 64: past 2^20 multiply-adds, heads split among threads
    ],
)
def test_attention_paths_equal_python(head_dim, n_heads, prompt_len, count_calls):
    """decode_layer's single-query attention (cpu_decode.cpp `attend`) against SDPA in the blocks."""
    torch.manual_seed(7)
    config = tiny_config(dim=64, hidden_dim=128, head_dim=head_dim, n_heads=n_heads, n_kv_heads=2,
                         max_seq_len=4096)  # fmt: skip
    model = Transformer(config).eval()
    model.reset_parameters(std=0.1)
    apply_kernels(model)
    prompt = torch.randint(0, 97, (1, prompt_len), generator=torch.Generator().manual_seed(11))
    python = decode_logits(model, prompt, 5, fused=None)
    fused = decode_logits(model, prompt, 5, fused="step")
    assert count_calls["decode_step"] == 5
    for a, b in zip(fused, python, strict=True):
        assert (a - b).abs().max() <= TOLERANCE[None] * b.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_generate_and_engine_give_the_same_tokens(count_calls):
    """Left-padded batched generation and the serving engine (cache rows) through the fused step."""
    from mixtral.text import load_tokenizer

    model = build("int4", vocab_size=32000)
    prompts = [[1, 5, 9, 200], [1, 7], [1, 3, 3, 3, 3, 3, 8]]

    def tokens(mode):
        set_fused(model, mode)
        return list(generate_ids(model, prompts, max_new_tokens=10))

    python = tokens(None)
    for mode in ("block", "step"):
        assert tokens(mode) == python, mode
    # "block": one op call per block; "step": generate_ids binds a StepPlan, no op call
    assert count_calls["decode_layer"] > 0 and count_calls["decode_step"] == 0
    assert FUSED_STEP.bind(model, KVCache.allocate(model.config, len(prompts), 8)) is not None

    tok = load_tokenizer(None)
    out = {}
    for fused_on in (None, "block", "step"):
        set_fused(model, fused_on)
        engine = Engine(model, tok, max_batch=4, step_tokens=16)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GenerationConfig(max_new_tokens=8))
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
        out[fused_on] = got
    assert out["block"] == out[None] and out["step"] == out[None]


def block_inputs(model, rows=None, slots=(5, 9)):
    cfg = model.config
    B = len(slots)
    k = torch.randn(cfg.n_layers, 4, cfg.n_kv_heads, 17, cfg.head_dim)
    v = torch.randn_like(k)
    positions = torch.tensor(slots)[:, None]
    caches = LayerCache.for_layers(k, v, positions, 17 - 1, rows)
    cos_sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(B, 1, cfg.dim)
    return x, cos_sin, positions, caches, k, v


@torch.no_grad()
def test_one_block_with_cache_rows_and_padding():
    """Rows of the cache other than the batch's, and a padding token (position -1, the spare slot)."""
    model = build("int8")
    block = model.layers[1]
    rows = torch.tensor([2, 0, 3])
    x, cos_sin, positions, _, k, v = block_inputs(model, rows, slots=(5, -1, 12))
    from mixtral.model.transformer import cache_mask

    results = []
    for fused in (True, False):
        kk, vv = k.clone(), v.clone()
        caches = LayerCache.for_layers(kk, vv, positions, 16, rows)
        block.fused_decode = FUSED_DECODE if fused else None
        out, logits = block(x, cos_sin, cache_mask(positions, 16), caches[1])
        results.append((out, logits, kk, vv))
    (a, la, ka, va), (b, lb, kb, vb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ka, kb, rtol=1e-6, atol=1e-6)  # the same slots written, the same values
    torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_hands_back_where_it_cannot_take_the_block(count_calls):
    model = build(None)
    block = model.layers[0]
    x, cos_sin, positions, caches, _, _ = block_inputs(model)
    assert FUSED_DECODE(block, x, cos_sin, caches[0]) is not None
    assert count_calls["decode_layer"] == 1
    # several tokens per row (prefill), bf16 activations, training, a custom dispatcher, autograd
    assert FUSED_DECODE(block, torch.randn(2, 3, 64), cos_sin, caches[0]) is None
    assert FUSED_DECODE(block, x.bfloat16(), cos_sin, caches[0]) is None
    block.train()
    assert FUSED_DECODE(block, x, cos_sin, caches[0]) is None
    block.eval()
    block.feed_forward.dispatcher = SortedDispatch()
    assert FUSED_DECODE(block, x, cos_sin, caches[0]) is None
    apply_kernels(model)  # AutoDispatch again: the kept arguments are rebuilt
    assert FUSED_DECODE(block, x, cos_sin, caches[0]) is not None
    with torch.enable_grad():
        assert FUSED_DECODE(block, x, cos_sin, caches[0]) is None
    assert count_calls["decode_layer"] == 2


@torch.no_grad()
def test_kept_arguments_follow_a_quantization():
    """Quantizing after a fused step replaces the modules; the next step must use the new weights."""
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    for mode in ("block", "step"):
        model = build(None)
        decode_logits(model, prompt, 2, fused=mode)  # arguments kept for the float modules
        quantize_model(model, "int4", ("experts", "attention"))
        fused = decode_logits(model, prompt, 4, fused=mode)
        python = decode_logits(model, prompt, 4, fused=None)
        for a, b in zip(fused, python, strict=True):
            assert (a - b).abs().max() <= TOLERANCE["int4"] * b.abs().max()


def test_op_rejects_bad_inputs():
    model = build("int4")
    block = model.layers[0]
    x, (cos, sin), positions, caches, _, _ = block_inputs(model)
    from mixtral.kernels.decode import _build

    args = _build(block)
    good = dict(x=x.view(2, -1), slots=caches[0].slots_BT.view(2), cos=cos.view(2, -1), sin=sin.view(2, -1))

    def call(**change):
        a = {**good, **change}
        return ops.decode_layer(a["x"], a["slots"], None, a["cos"], a["sin"], caches[0].k, caches[0].v, *args)

    call()
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        call(cos=good["cos"][:, :4].contiguous())
    with pytest.raises(RuntimeError, match="slot 99 outside"):
        call(slots=torch.tensor([3, 99]))
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        call(x=good["x"].double())
    with pytest.raises(RuntimeError, match="slots must be int64"):
        call(slots=torch.tensor([3.0, 4.0]))


def test_step_hands_back_to_the_blocks_when_one_cannot_be_fused(count_calls):
    """A custom dispatcher in one block: no whole-step call; the other blocks still fuse one by one."""
    model = build("int4", n_layers=3)
    model.layers[1].feed_forward.dispatcher = SortedDispatch()
    prompt = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    python = decode_logits(model, prompt, 5, fused=None)
    fused = decode_logits(model, prompt, 5, fused="step")
    assert count_calls == {"decode_layer": 5 * 2, "decode_step": 0}
    for a, b in zip(fused, python, strict=True):
        assert (a - b).abs().max() <= TOLERANCE["int4"] * b.abs().max()


@torch.no_grad()
def test_decode_step_rejects_bad_tokens_and_positions():
    model = build(None)
    cache = KVCache.allocate(model.config, 1, 8)
    model(torch.tensor([[3]]), cache)  # a valid fused step
    with pytest.raises(RuntimeError, match="token id 97 outside"):
        model.fused_step(model, torch.tensor([[97]]), torch.tensor([[1]]), cache.k, cache.v, None)
    with pytest.raises(RuntimeError, match="position 8 outside"):
        model.fused_step(model, torch.tensor([[3]]), torch.tensor([[8]]), cache.k, cache.v, None)


@torch.no_grad()
def test_whole_step_arguments_follow_changes(count_calls):
    """Each change that alters the step is seen before the next one: a block in training mode or with
    another dispatcher (no whole step), an added block, scales converted by `.float()`."""
    model = build("int4", n_layers=2)
    prompt = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    decode_logits(model, prompt, 2, fused="step")
    assert count_calls["decode_step"] == 2
    model.layers[0].train()
    decode_logits(model, prompt, 2, fused="step")
    assert count_calls["decode_step"] == 2  # handed back (and the block's own fused_decode too)
    model.layers[0].eval()
    model.layers.append(build("int4", seed=9).layers[0])
    model.config = model.config.replace(n_layers=3)
    fused = decode_logits(model, prompt, 3, fused="step")
    python = decode_logits(model, prompt, 3, fused=None)
    assert count_calls["decode_step"] == 2 + 3
    for a, b in zip(fused, python, strict=True):
        assert (a - b).abs().max() <= TOLERANCE["int4"] * b.abs().max()
    model.float()  # the fp16 scales become fp32 tensors: new objects, read again (and refused: not fp16)
    with pytest.raises(RuntimeError, match="float16"):
        decode_logits(model, prompt, 1, fused="step")


def test_schemas_and_fakes_of_the_fused_ops():
    """torch.library.opcheck: the schemas (the caches declared as written) and the fake impls' shapes."""
    from mixtral.kernels.decode import _build

    model = build("int4", vocab_size=97)
    block = model.layers[0]
    x, (cos, sin), _, caches, _, _ = block_inputs(model)
    layer_args = (x.view(2, -1), caches[0].slots_BT.view(2), None, cos.view(2, -1), sin.view(2, -1),
                  caches[0].k.clone(), caches[0].v.clone(), *_build(block))  # fmt: skip
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mixtral_cpu.decode_layer.default, layer_args, test_utils=checks)
    cache = KVCache.allocate(model.config, 2, 8)
    step = FUSED_STEP._build(model)
    step_args = (
        torch.tensor([3, 5]),
        torch.tensor([0, 2]),
        None,
        step.inv_freq,
        cache.k,
        cache.v,
        *step[1:-1],
        *step.layers,
    )
    torch.library.opcheck(torch.ops.mixtral_cpu.decode_step.default, step_args, test_utils=checks)


def _left_padded(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of lengths 7, 4, 6, ... left-padded as generate_ids pads them (position -1)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (batch, 7), generator=g)
    positions = torch.arange(7).repeat(batch, 1)
    for b in range(1, batch):
        positions[b, : b % 4] = -1
        positions[b] = torch.where(positions[b] < 0, -1, positions[b] - b % 4)
    return tokens, positions


@torch.no_grad()
@pytest.mark.parametrize("storage", ["int4", None, "int8"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bound_step_equals_the_forward_step(storage, batch, count_calls):
    """make_decode_step's bound `StepPlan` against the model's forward (the `decode_step` op): the same
    logits bit for bit, the same cache contents and length, and no forward or op call of its own."""
    from mixtral.inference import make_decode_step
    from mixtral.inference.generate import decode_one_token

    model = build(storage)
    tokens, positions = _left_padded(batch, seed=batch)
    caches, logits = [], []
    for bound in (False, True):
        cache = KVCache.allocate(model.config, batch, 7 + 9)
        model(tokens, cache, positions, keep_logits=1)
        step = make_decode_step(model, cache) if bound else (
            lambda t, p, cache=cache: decode_one_token(model, t, p, cache))  # fmt: skip
        before = dict(count_calls)
        tok, pos, got = torch.tensor([3] * batch), positions[:, -1] + 1, []
        for _ in range(9):
            out = step(tok, pos)
            got.append(out)
            tok, pos = out.argmax(-1), pos + 1
        calls = {k: count_calls[k] - before[k] for k in count_calls}
        assert calls == (
            {"decode_layer": 0, "decode_step": 0} if bound else {"decode_layer": 0, "decode_step": 9}
        )
        caches.append(cache)
        logits.append(got)
    for a, b in zip(*logits, strict=True):
        assert torch.equal(a, b)
    assert caches[0].length == caches[1].length == 16
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)


@torch.no_grad()
def test_plan_equals_the_op_with_rows_and_router_logits():
    """StepPlan.run (a serving engine's rows, the router logits) equals the one-call op."""
    model = build("int4", n_layers=3)
    args = FUSED_STEP._build(model)
    plan = ops.step_plan(*args)
    cache = KVCache.allocate(model.config, 4, 12)
    cache.k.normal_()
    cache.v.normal_()
    tokens, positions, rows = torch.tensor([3, 50, 7]), torch.tensor([4, -1, 9]), torch.tensor([2, 0, 3])
    outs = []
    for call in ("op", "plan"):
        k, v = cache.k.clone(), cache.v.clone()
        if call == "op":
            got = ops.decode_step(tokens, positions, rows, args.inv_freq, k, v, *args[1:-1], args.layers)
        else:
            got = plan.run(tokens, positions, rows, k, v)
        outs.append((*got, k, v))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert outs[0][1].shape == (3, 3, model.config.n_experts)
    with pytest.raises(RuntimeError, match="one entry per layer"):
        ops.step_plan(*args[:-1], tuple(lst[:1] for lst in args.layers[:-1]) + (args.layers[-1],))


@torch.no_grad()
def test_bound_step_errors_and_hand_back():
    """A full or replaced cache, a bad token id: clear errors. Where the whole step cannot run in C++
    (a custom dispatcher, too many rows, training) no step is bound and the forward runs instead."""
    from mixtral.errors import GenerationError
    from mixtral.inference import make_decode_step

    model = build("int4")
    cache = KVCache.allocate(model.config, 1, 3)
    step = make_decode_step(model, cache)  # bound: the op's own error below, not the forward's ValueError
    tok, pos = torch.tensor([3]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="token id 97 outside"):
        step(torch.tensor([97]), pos)
    for i in range(3):
        step(tok, pos + i)
    with pytest.raises(GenerationError, match="exceed the cache length of 3"):
        step(tok, pos + 3)
    cache.k = cache.k.clone()
    with pytest.raises(GenerationError, match="KV cache was replaced"):
        step(tok, pos)

    assert FUSED_STEP.bind(model, KVCache.allocate(model.config, policy.KERNEL_MAX_ROWS + 1, 4)) is None
    model.layers[1].feed_forward.dispatcher = SortedDispatch()
    assert FUSED_STEP.bind(model, cache) is None
    apply_kernels(model)
    model.train()
    assert FUSED_STEP.bind(model, cache) is None


@torch.no_grad()
def test_generate_ids_binds_each_request_to_the_weights_it_has():
    """The bound step keeps the weights it was bound with; generate_ids binds one per request, so a
    quantization between requests is seen (tokens equal the blocks' Python path each time)."""
    model = build(None)
    prompts = [[1, 5, 9, 200 % 97], [1, 7]]

    def tokens(mode):
        set_fused(model, mode)
        return list(generate_ids(model, prompts, max_new_tokens=8))

    assert tokens("step") == tokens(None)
    quantize_model(model, "int4", ("experts", "attention"))
    apply_kernels(model)
    assert tokens("step") == tokens(None)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_bound_greedy_step_equals_argmax_of_its_logits(batch):
    """step.greedy: the step's tokens straight from C++, equal to torch.argmax of the same step's logits,
    also on ties, NaN and infinities in the logits (an output head set to produce them)."""
    from mixtral.inference import make_decode_step

    model = build("int4", vocab_size=97)
    tokens, positions = _left_padded(batch, seed=7)
    runs = []
    for greedy in (False, True):
        cache = KVCache.allocate(model.config, batch, 7 + 6)
        model(tokens, cache, positions, keep_logits=1)
        step = make_decode_step(model, cache)
        tok, pos, got = torch.tensor([3] * batch), positions[:, -1] + 1, []
        for _ in range(6):
            tok = step.greedy(tok, pos) if greedy else step(tok, pos).argmax(-1)
            got.append(tok)
            pos = pos + 1
        runs.append(got)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))

    # Chosen logits: a float output head reading only hn[0] (logit r = hn[0] · w[r, 0]), its sign s found
    # first; then a tie (10 before 40), +inf (at 5) and NaN (at 2, which torch.argmax ranks first).
    model = build(None, vocab_size=97)
    w = model.output.weight
    w.zero_()
    w[:, 0] = 1.0
    cache = KVCache.allocate(model.config, 1, 8)
    step = make_decode_step(model, cache)

    def both() -> tuple[int, int]:
        cache.length = 0
        logits = step(torch.tensor([3]), torch.tensor([0]))
        cache.length = 0
        return int(step.greedy(torch.tensor([3]), torch.tensor([0]))), int(logits.argmax(-1))

    cache.length = 0
    s = float(step(torch.tensor([3]), torch.tensor([0]))[0, 0].sign())
    assert s != 0
    w[:, 0] = s
    w[10, 0] = w[40, 0] = 2 * s
    assert both() == (10, 10)
    w[5, 0] = s * float("inf")
    assert both() == (5, 5)
    w[2, 0] = float("nan")
    assert both() == (2, 2)
    w[:, 0] = -s * float("inf")  # every logit -inf: the first
    assert both() == (0, 0)


def test_generate_ids_greedy_through_the_bound_step(monkeypatch):
    """Greedy generate_ids takes its tokens from step.greedy, the same as sampling the logits."""
    generate_mod = sys.modules["mixtral.inference.generate"]  # the package exports a `generate` function
    model = build("int4", vocab_size=97)
    prompts = [[1, 5, 9, 20], [1, 7]]
    with_greedy = list(generate_ids(model, prompts, max_new_tokens=9))
    calls = []
    real = generate_mod.sample
    monkeypatch.setattr(generate_mod, "sample", lambda *a: calls.append(1) or real(*a))
    assert list(generate_ids(model, prompts, max_new_tokens=9)) == with_greedy
    assert len(calls) == 1  # after prefill only: every decode step took step.greedy
    set_fused(model, None)  # the modules' forward and torch.argmax
    assert list(generate_ids(model, prompts, max_new_tokens=9)) == with_greedy
