"""The seams the next features plug into: dispatcher objects, kernels applied from outside, the
checkpoint reader, one generation config, atomic writes and the eval-mode scope."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch import nn

from mixtral.atomic import atomic_directory, atomic_file, write_atomic
from mixtral.checkpoint import CheckpointReader, load_model, save_model
from mixtral.errors import GenerationError, NonFiniteWeightError
from mixtral.eval.mode import eval_mode
from mixtral.inference import GenerationConfig, generate_ids
from mixtral.kernels import AutoDispatch, KernelLinear, apply_kernels
from mixtral.model import LoopDispatch, SortedDispatch, Transformer


class CountingDispatch:
    """A dispatcher from outside the model: counts calls, delegates to the reference."""

    def __init__(self) -> None:
        self.calls = 0
        self.reference = LoopDispatch()

    def __call__(self, x_TD, ids_TK, weights_TK, experts):
        self.calls += 1
        return self.reference(x_TD, ids_TK, weights_TK, experts)


def test_a_dispatcher_object_from_outside_plugs_into_every_layer():
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(tokens).logits
        counting = CountingDispatch()
        model.set_dispatcher(counting)
        got = model(tokens).logits
    assert counting.calls == model.config.n_layers
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_apply_kernels_keeps_parameters_and_state_dict_and_is_idempotent():
    model = Transformer(tiny_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    custom = CountingDispatch()
    model.layers[0].feed_forward.dispatcher = custom
    apply_kernels(model)
    apply_kernels(model)  # a second call changes nothing
    assert isinstance(model.output, KernelLinear) and isinstance(model.layers[1].attention.wq, KernelLinear)
    assert {id(p) for p in model.parameters()} == params  # the same Parameters, no copies
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dispatcher = model.layers[0].feed_forward.dispatcher
    assert isinstance(dispatcher, AutoDispatch) and dispatcher.fallback is custom  # composes
    assert isinstance(model.layers[1].feed_forward.dispatcher.fallback, SortedDispatch)


def test_kernels_change_speed_not_results(tmp_path):
    """load_model applies the kernels by default; kernels=False gives the plain model; same tokens."""
    save_model(Transformer(tiny_config()), tmp_path / "m")
    fast, plain = load_model(tmp_path / "m"), load_model(tmp_path / "m", kernels=False)
    assert isinstance(fast.output, KernelLinear) and type(plain.output) is nn.Linear
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = [s for s in generate_ids(fast, prompts, max_new_tokens=8)]
    b = [s for s in generate_ids(plain, prompts, max_new_tokens=8)]
    assert a == b


def test_generation_config_validates_and_options_override_it():
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(GenerationError, match="chunk_size"):
        GenerationConfig(chunk_size=-1)
    with pytest.raises(GenerationError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(GenerationError, match="stop"):
        GenerationConfig(stop=("ok", 3))
    assert GenerationConfig(stop="END").stop == ("END",)
    with pytest.raises(TypeError, match="unknown generation option"):
        GenerationConfig().replace(max_tokens=3)
    model = Transformer(tiny_config()).eval()
    with pytest.raises(TypeError, match="GenerationConfig"):
        list(generate_ids(model, [[1, 2]], {"max_new_tokens": 2}))
    config = GenerationConfig(max_new_tokens=4, temperature=1.0, top_k=5, seed=3)
    by_config = list(generate_ids(model, [[1, 2, 3]], config))
    by_options = list(generate_ids(model, [[1, 2, 3]], max_new_tokens=4, temperature=1.0, top_k=5, seed=3))
    overridden = list(generate_ids(model, [[1, 2, 3]], config, max_new_tokens=2))
    assert by_config == by_options and len(by_config) == 4 and overridden == by_config[:2]


def test_checkpoint_reader_reads_lazily_and_verifies(tmp_path):
    model = Transformer(tiny_config())
    save_model(model, tmp_path / "m", format="mistral")  # wq/wk rows permuted on disk
    with CheckpointReader(tmp_path / "m") as reader:
        assert reader.format == "mistral" and reader.config == model.config
        assert reader.file_dtypes == {torch.float32}
        assert list(reader.shapes) == list(model.state_dict())
        for name, want in model.state_dict().items():
            assert torch.equal(reader.read(name), want), name
        w1 = "layers.1.feed_forward.experts.w1"
        assert torch.equal(reader.read_piece(w1, 2), model.state_dict()[w1][2])
        assert reader.read("norm.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
        reader.verify()
        with pytest.raises(KeyError, match="not a parameter"):
            reader.read("layers.9.attention.wq.weight")


def test_checkpoint_reader_names_a_non_finite_tensor(tmp_path):
    model = Transformer(tiny_config())
    with torch.no_grad():
        model.layers[0].feed_forward.experts.w3[1, 0, 0] = float("nan")
    save_model(model, tmp_path / "m")
    with CheckpointReader(tmp_path / "m") as reader:
        reader.read("norm.weight")  # other tensors read fine
        with pytest.raises(NonFiniteWeightError, match=r"experts\.1\.w3"):
            reader.verify()
        assert reader.read("layers.0.feed_forward.experts.w3", check_finite=False).isnan().sum() == 1


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "report.json"
    write_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not a private temporary's 0600
    with atomic_file(tmp_path / "arrays.npz") as tmp:
        np.savez(tmp, x=np.arange(3))  # np.savez appends .npz to a path without it: the suffix stays last
    assert np.load(tmp_path / "arrays.npz")["x"].tolist() == [0, 1, 2]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="overwrite"), atomic_directory(out):
        pass
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt"
    ]
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700


def test_eval_mode_restores_each_model_also_on_error():
    a, b = nn.Linear(2, 2).train(), nn.Linear(2, 2).eval()
    with pytest.raises(RuntimeError), eval_mode(a, b, "not a module"):
        assert not a.training and not b.training
        raise RuntimeError
    assert a.training and not b.training
