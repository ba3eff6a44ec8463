"""The kernel build cache: keyed by what the binary depends on, never blocked by a dead builder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mixtral.kernels import ops


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXTRAL_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_dir_follows_sources_flags_and_cache_root(cache, monkeypatch):
    first = ops.build_dir()
    assert first.parent == cache and first.name.startswith("mixtral_cpu_kernels-")
    assert ops.build_dir() == first  # deterministic: two checkouts of the same kernels share it
    monkeypatch.setattr(ops, "CFLAGS", (*ops.CFLAGS, "-DEXTRA"))
    assert ops.build_dir() != first
    monkeypatch.setattr(ops, "_cpu_flags", lambda: "flags: another cpu")
    assert ops.build_dir().name != first.name


class FakeBuild:
    """Stands in for torch's compiler and loader; records what the build asked for."""

    def __init__(self, monkeypatch):
        from torch.utils import cpp_extension

        self.builds: list[str] = []
        self.loaded: list[str] = []
        monkeypatch.setattr(cpp_extension, "load", lambda **kw: self.builds.append(kw["build_directory"]))
        monkeypatch.setattr(ops.torch.ops, "load_library", lambda path: self.loaded.append(path))
        monkeypatch.setattr(ops, "_register_fakes", lambda: None)


def test_a_killed_builder_blocks_nothing_and_a_finished_build_is_reused(cache, monkeypatch, capsys):
    directory = ops.build_dir()
    directory.mkdir(parents=True)
    (directory / "lock").write_text("")  # torch's lock file, left by a build killed mid-way
    # A builder that holds our flock, then dies without releasing it.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), f"{directory}.lock"], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        fake = FakeBuild(monkeypatch)
        t0 = time.perf_counter()
        assert ops._build()
        assert time.perf_counter() - t0 < 10
    finally:
        holder.kill()
    assert fake.builds == [str(directory)] and not (directory / "lock").exists()
    assert (directory / "BUILT").is_file() and fake.loaded == [
        str(directory / f"{directory.name.replace('-', '_')}.so")
    ]
    assert {p.name for p in directory.iterdir()} >= set(ops.SOURCES)  # built from its own copy of the sources
    err = capsys.readouterr().err
    assert "building the CPU decode kernels" in err and "built the CPU decode kernels" in err
    assert ops._build() and fake.builds == [str(directory)]  # loaded from the finished build, no ninja
    assert capsys.readouterr().err == ""


def test_a_failed_build_leaves_no_marker(cache, monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kw):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with pytest.raises(RuntimeError, match="compiler exploded"):
        ops._build()
    assert not (ops.build_dir() / "BUILT").exists()
    assert os.environ["PATH"].split(os.pathsep)[0] != __import__("ninja").BIN_DIR  # PATH restored


@pytest.mark.slow
def test_a_real_build_killed_midway_does_not_hang_the_next_command(cache):
    """The real compiler: kill the first build while it compiles, then the next build must finish."""
    env = {**os.environ, "MIXTRAL_KERNELS_CACHE": str(cache)}
    first = subprocess.Popen(
        [sys.executable, "-m", "mixtral.kernels"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert "building the CPU decode kernels" in first.stderr.readline()
    time.sleep(5)  # inside the compiler
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    again = subprocess.run([sys.executable, "-m", "mixtral.kernels"], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "ready" in again.stdout
