"""How a job's ranks are laid out: data parallelism (FSDP2 shards, replicas) and expert parallelism.

The ranks of a `torchrun` job form a 3-D device mesh ("dp_replicate", "dp_shard_mod_ep", "ep"), as in
torchtitan: expert parallelism borrows its ranks from the sharded data-parallel dimension, so every
rank still reads its own slice of the batch.
- Dense weights (attention, norms, router, embeddings) are sharded by FSDP2 over
  "dp_shard" = "dp_shard_mod_ep" × "ep" and replicated over "dp_replicate" (HSDP when that is > 1).
- Expert weights are first split by expert over "ep" (rank i of an EP group holds experts
  [i·E/ep, (i+1)·E/ep)), then sharded by FSDP2 over "dp_shard_mod_ep" and replicated over
  "dp_replicate".

`ParallelConfig` is what a user sets (`--set parallel.ep=2`); `Layout` is the live mesh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mixtral.errors import ConfigError


@dataclass(frozen=True)
class ParallelConfig:
    """ep: experts split over this many ranks; dp_shard: FSDP2 shard group size (-1: every rank not
    in dp_replicate); dp_replicate: replicas of the sharded model (HSDP). world = dp_replicate × dp_shard,
    and ep must divide dp_shard (its ranks come from there)."""

    ep: int = 1
    dp_shard: int = -1
    dp_replicate: int = 1

    def __post_init__(self) -> None:
        if self.ep < 1 or self.dp_replicate < 1 or (self.dp_shard < 1 and self.dp_shard != -1):
            raise ConfigError(
                f"parallel.ep and parallel.dp_replicate must be >= 1 and parallel.dp_shard >= 1 or -1, got "
                f"ep={self.ep}, dp_shard={self.dp_shard}, dp_replicate={self.dp_replicate}"
            )

    def resolve(self, world: int, n_experts: int) -> ParallelConfig:
        """The same layout with dp_shard filled in for `world` ranks; a ConfigError naming what does not fit."""
        if world % self.dp_replicate:
            raise ConfigError(f"parallel.dp_replicate={self.dp_replicate} does not divide the {world} ranks")
        shard = world // self.dp_replicate if self.dp_shard == -1 else self.dp_shard
        if self.dp_replicate * shard != world:
            raise ConfigError(
                f"parallel.dp_replicate × parallel.dp_shard = {self.dp_replicate} × {shard} must equal the "
                f"{world} ranks of this job"
            )
        if shard % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={shard}: expert parallelism borrows its "
                "ranks from the sharded data-parallel dimension"
            )
        if n_experts % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide the model's {n_experts} experts")
        return ParallelConfig(ep=self.ep, dp_shard=shard, dp_replicate=self.dp_replicate)


def device_for_rank() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group(timeout_s: float = 300.0) -> None:
    """Join the job `torchrun` started (its RANK, WORLD_SIZE, MASTER_ADDR... environment): NCCL on
    GPUs, gloo on CPUs. A collective that waits longer than `timeout_s` fails instead of hanging."""
    from datetime import timedelta

    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "not started by torchrun: RANK and WORLD_SIZE are not set (torchrun --nproc-per-node N ...)"
        )
    device = device_for_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


@dataclass
class Layout:
    """The live layout of a job: its config (dp_shard resolved), mesh and this rank's place in it."""

    config: ParallelConfig
    mesh: DeviceMesh  # ("dp_replicate", "dp_shard_mod_ep", "ep")
    device: torch.device

    @property
    def world(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def ep(self) -> int:
        return self.config.ep

    @property
    def ep_rank(self) -> int:
        return self.mesh["ep"].get_local_rank()

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def dense_mesh(self) -> DeviceMesh:
        """("dp_replicate", "dp_shard"): where FSDP2 puts the dense weights."""
        return self.mesh["dp_replicate", "dp_shard"]

    @property
    def expert_mesh(self) -> DeviceMesh:
        """("dp_replicate", "dp_shard_mod_ep"): where FSDP2 puts each EP rank's experts."""
        return self.mesh["dp_replicate", "dp_shard_mod_ep"]


def make_layout(config: ParallelConfig, n_experts: int) -> Layout:
    """The layout of the running job (init_process_group first) for a model of `n_experts` experts."""
    world = dist.get_world_size()
    cfg = config.resolve(world, n_experts)
    device = device_for_rank()
    mesh = init_device_mesh(
        device.type,
        (cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.ep),
        mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"),
    )
    mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
    return Layout(cfg, mesh, device)
