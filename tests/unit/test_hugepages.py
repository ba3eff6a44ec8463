"""Large CPU weights moved into transparent huge pages (`mixtral.kernels.hugepages`): same values, same
module structure, really in huge pages where the kernel offers them, and nothing moved where not."""

from __future__ import annotations

import pytest
import torch
from helpers import save_tiny_model, tiny_config
from torch import nn

from mixtral.checkpoint import load_model
from mixtral.kernels import hugepages
from mixtral.model import Transformer

MiB = 1 << 20


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process holding `address`."""
    inside = False
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo <= address < hi
        elif inside and fields[0] == "AnonHugePages:":
            return int(fields[1])
    raise AssertionError(f"no mapping holds {address:#x}")


needs_thp = pytest.mark.skipif(not hugepages.huge_pages_available(), reason="no transparent huge pages here")


def test_empty_huge_is_aligned_writable_memory():
    t = hugepages.empty_huge((3, 5 * MiB // 4 + 7), torch.float32)
    assert t.shape == (3, 5 * MiB // 4 + 7) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.fill_(2.5)
    assert bool((t == 2.5).all())


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(1024, 1024), requires_grad=False)  # 4 MiB
        self.trained = nn.Parameter(torch.randn(512, 1024))  # 2 MiB, requires grad
        self.small = nn.Parameter(torch.randn(16, 16))
        base = torch.randn(2048, 1024)
        self.register_buffer("view", base[:1024])  # a view of a larger tensor: not moved
        self.register_buffer("packed", torch.randint(0, 255, (3 * MiB,), dtype=torch.uint8))
        self.embedding = nn.Embedding(2048, 1024)  # 8 MiB, read by row: not moved
        self.twin = nn.Linear(1024, 1024, bias=False)
        self.twin.weight = self.big  # one tensor in two places


@needs_thp
def test_moves_large_tensors_keeping_values_and_structure():
    m = Holder()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    old = {k: v.data_ptr() for k, v in m.state_dict().items()}
    moved = hugepages.move_to_huge_pages(m)
    assert moved == (4 + 2) * MiB + 3 * MiB
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    new = {k: v.data_ptr() for k, v in m.state_dict().items()}
    for k in ("big", "trained", "packed"):
        assert new[k] != old[k] and new[k] % hugepages.HUGE_PAGE == 0, k
        assert huge_kb_at(new[k]) >= 2048, k  # at least one whole 2 MiB page backs it
    for k in ("small", "view", "embedding.weight"):
        assert new[k] == old[k], k
    assert isinstance(m.big, nn.Parameter) and not m.big.requires_grad
    assert isinstance(m.trained, nn.Parameter) and m.trained.requires_grad
    assert m.twin.weight is m.big  # still one tensor
    m.trained.sum().backward()  # still a leaf that trains
    assert m.trained.grad is not None


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    m = Holder()
    old = {k: v.data_ptr() for k, v in m.state_dict().items()}
    assert hugepages.move_to_huge_pages(m) == 0
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == old


def test_availability_follows_the_kernel_setting(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(hugepages, "_THP_SETTING", setting)
    for text, want in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                       ("always madvise [never]\n", False)):  # fmt: skip
        setting.write_text(text)
        assert hugepages.huge_pages_available() is want
    setting.unlink()
    assert hugepages.huge_pages_available() is False


@needs_thp
@torch.no_grad()
def test_load_model_places_weights_in_huge_pages(tmp_path):
    """A checkpoint's large matrices in huge pages, the same logits as a load without."""
    config = tiny_config(
        dim=256, hidden_dim=2048, n_experts=4, vocab_size=97
    )  # experts 4x2048x256 fp32: 8 MiB
    save_tiny_model(tmp_path / "m", Transformer(config))
    plain = load_model(tmp_path / "m", huge_pages=False)
    huge = load_model(tmp_path / "m")
    w = huge.layers[0].feed_forward.experts.w1
    assert w.data_ptr() % hugepages.HUGE_PAGE == 0 and huge_kb_at(w.data_ptr()) >= 2048
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(tokens).logits, huge(tokens).logits)
