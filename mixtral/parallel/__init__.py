"""Training on many processes through torch.distributed: expert parallelism and FSDP2 (see docs/scaling.md)."""

from mixtral.parallel.apply import clip_grad_norm, parallelize
from mixtral.parallel.ep import ExpertParallelDispatch, all_to_all, shard_experts
from mixtral.parallel.layout import Layout, ParallelConfig, init_process_group, make_layout
from mixtral.parallel.reduce import all_reduce_sum, any_rank, mean_over_ranks, sum_over_ranks

__all__ = [
    "ExpertParallelDispatch",
    "Layout",
    "ParallelConfig",
    "all_reduce_sum",
    "all_to_all",
    "any_rank",
    "clip_grad_norm",
    "init_process_group",
    "make_layout",
    "mean_over_ranks",
    "parallelize",
    "shard_experts",
    "sum_over_ranks",
]
