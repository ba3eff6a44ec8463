"""The expert cache: a fixed pool of expert slots in memory, a per-layer LRU policy, background loads.

Policy (the routing report's LRU simulation, `analysis.routing_stats.lru_hit_histogram`, exactly):
each layer keeps an LRU stack of the experts it has used; a token's k experts are looked up in the
cache as it was before the token, then become the most recently used (the first choice last, so it
is the most recent), and the cache holds the top `capacity` experts of the stack. So a decode step
of one token hits exactly when the simulation says it does, whatever `capacity` (also below k: the
experts of one token are then resident together in spare slots for that step only).

Memory: one pool of slots, `n_layers · capacity` for the caches plus `n_experts + top_k` spare ones
(the misses of one step, and the prefetched experts of the next layer), allocated once. Slots are
fungible, so keeping an expert, adopting a prefetched one or dropping one moves no bytes.

On a CUDA device the pool lives in GPU memory (mixtral-offloading's layout): an expert is read from
the file into a pinned host staging buffer, copied to its slot on a copy stream of its own (after
the compute stream has finished with the slot's previous expert: an event recorded when the slot
was freed), and the read counts as done once that copy has landed, so the compute stream never
sees a half-written slot. Reads for the next layer thus overlap the current layer's GPU work.

Prefetch (mixtral-offloading's speculative loading): while layer l computes, layer l+1's router is
applied to layer l's MoE input, and its predicted experts that are not cached are read into spare
slots on a background thread. They stay outside the cache until layer l+1 uses them (then adopted,
counted as "prefetched" instead of a blocking load), so the cache's contents, and its hit rate,
are the same with and without prefetch; unused predictions are dropped.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mixtral.model.dispatch import swiglu_groups
from mixtral.offload.store import ExpertStore
from mixtral.quant import group

NAMES = ("qw1", "qw3", "qw2", "sw1", "sw3", "sw2")


@dataclass
class OffloadStats:
    """Counters over every MoE call since the last `reset_stats()`."""

    requests: int = 0  # (token, k) expert requests, all layers
    hits: int = 0  # ... whose expert was cached at the start of its step
    prefetched: int = 0  # missed experts whose load the prefetcher had started
    demand_loads: int = 0  # experts read while the step waited
    prefetch_issued: int = 0  # experts read ahead for the next layer
    prefetch_used: int = 0  # ... that the next layer then used
    bytes_read: int = 0
    tokens: int = 0  # tokens through the first layer
    wait_s: float = 0.0  # time the model waited for expert reads
    per_layer_requests: list[int] = field(default_factory=list)
    per_layer_hits: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")

    @property
    def prefetch_precision(self) -> float:
        """Share of read-ahead experts that the next layer used."""
        return self.prefetch_used / self.prefetch_issued if self.prefetch_issued else float("nan")

    @property
    def misses_prefetched(self) -> float:
        """Share of misses whose expert was already being read ahead."""
        misses = self.prefetched + self.demand_loads
        return self.prefetched / misses if misses else float("nan")

    def summary(self) -> dict:
        return {
            "hit_rate": self.hit_rate,
            "prefetch_precision": self.prefetch_precision,
            "misses_prefetched": self.misses_prefetched,
            "bytes_read_per_token": self.bytes_read / self.tokens if self.tokens else float("nan"),
            "experts_read": self.demand_loads + self.prefetch_issued,
            "requests": self.requests,
            "tokens": self.tokens,
            "wait_s": self.wait_s,
        }


class _SlotExperts:
    """The pool seen as stacked experts indexed by slot: what the kernels and SortedDispatch read."""

    kernel_format = "group"

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self.bits = cache.store.layout.bits

    @property
    def n_experts(self) -> int:
        return self.cache.n_slots

    def stacked(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.cache.pool[n] for n in NAMES)

    def __getitem__(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, dtype = self.cache.pool, self.cache.compute_dtype
        return tuple(
            group.dequantize(p[f"q{w}"][s], p[f"s{w}"][s], self.bits, dtype) for w in ("w1", "w3", "w2")
        )  # type: ignore[return-value]

    def weights(self) -> _SlotExperts:
        return self

    def grouped(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return swiglu_groups(x_SD, counts, self)

    def parameters(self) -> list[torch.Tensor]:
        return []


class ExpertCache:
    """`capacity` experts per layer in memory, read from `store` on demand (see the module docstring)."""

    def __init__(
        self,
        store: ExpertStore,
        capacity: int,
        prefetch: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        cfg = store.config
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the expert cache lives in host or CUDA memory, not on {self.device}")
        if capacity < 1:
            raise ValueError(f"expert cache capacity must be at least 1 expert per layer, got {capacity}")
        self.store, self.prefetch, self.compute_dtype = store, prefetch, compute_dtype
        self.n_layers, self.n_experts, self.top_k = cfg.n_layers, cfg.n_experts, cfg.top_k
        self.capacity = min(capacity, cfg.n_experts)
        self.n_slots = self.n_layers * self.capacity + self.n_experts + self.top_k
        self.pool = {
            k: torch.empty((self.n_slots, *shape), dtype=dtype, device=self.device)
            for k, (dtype, shape) in store.slot_shapes().items()
        }
        # CUDA: pinned host buffers the reads land in (one per read in flight, made on demand: the
        # reader thread's and a blocking load's), and for each freed slot the compute stream's event
        # after which it may be overwritten.
        self._staging: list[tuple[dict[str, torch.Tensor], torch.cuda.Stream]] = []
        self._freed_at: dict[int, torch.cuda.Event] = {}
        self.view = _SlotExperts(self)
        self.record = False  # keep every layer's routed ids (routing_trace)
        # read-ahead in flight or done: (layer, expert) -> (slot, its read)
        self.pending: dict[tuple[int, int], tuple[int, Future]] = {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="mixtral-expert-reader")
        self._lock = threading.Lock()
        self.reset()

    @property
    def resident_bytes(self) -> int:
        """Bytes of the slot pool (allocated once)."""
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def reset(self) -> None:
        """Empty every layer's cache (a cold start, as the simulation starts each sequence) and the stats."""
        self._drain()
        self.free = list(range(self.n_slots))
        self.stack: list[list[int]] = [[] for _ in range(self.n_layers)]  # most recent first
        self.slot_of: list[dict[int, int]] = [{} for _ in range(self.n_layers)]  # cached expert -> slot
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = OffloadStats(per_layer_requests=[0] * self.n_layers, per_layer_hits=[0] * self.n_layers)
        self._trace: list[list[torch.Tensor]] = [[] for _ in range(self.n_layers)]

    def routing_trace(self) -> torch.Tensor:
        """[L, 1, T, K]: the expert ids every layer was asked for since `record` was set (or the last
        reset), tokens in order: what `analysis.routing_stats.lru_hit_histogram` simulates."""
        if not self._trace[0]:
            raise RuntimeError("no routing recorded: set cache.record = True before running the model")
        return torch.stack([torch.cat(t) for t in self._trace]).unsqueeze(1)

    def _slot(self, s: int) -> dict[str, torch.Tensor]:
        return {k: t[s] for k, t in self.pool.items()}

    def _read(self, layer: int, expert: int, slot: int) -> int:
        """Read one expert into `slot`; returns the bytes read. On CUDA, returns once it is in GPU memory."""
        if self.device.type == "cpu":
            return self.store.load(layer, expert, self._slot(slot))
        with self._lock:
            freed_at = self._freed_at.pop(slot, None)
            staging = self._staging.pop() if self._staging else None
        if staging is None:
            buffers = {k: torch.empty(shape, dtype=dtype, pin_memory=True)
                       for k, (dtype, shape) in self.store.slot_shapes().items()}  # fmt: skip
            staging = (buffers, torch.cuda.Stream(self.device))
        buffers, stream = staging
        try:
            n = self.store.load(layer, expert, buffers)
            with torch.cuda.stream(stream):
                if freed_at is not None:
                    stream.wait_event(freed_at)
                for k, t in self.pool.items():
                    t[slot].copy_(buffers[k], non_blocking=True)
            stream.synchronize()  # landed: visible to every stream, and the staging buffer is free again
        finally:
            with self._lock:
                self._staging.append(staging)
        return n

    # ---- one MoE call: acquire (hits, waits, loads), compute outside, release (policy) -------------

    def acquire(self, layer: int, ids_TK: torch.Tensor) -> tuple[torch.Tensor, dict[int, int]]:
        """Make every expert of `ids_TK` resident; (their slot per (token, k), experts held only this step)."""
        ids = ids_TK.tolist()
        if self.record:
            self._trace[layer].append(ids_TK.detach().cpu().clone())
        cached = self.slot_of[layer]
        st = self.stats
        n = len(ids) * len(ids[0])
        hits = sum(e in cached for row in ids for e in row)
        st.requests += n
        st.hits += hits
        st.per_layer_requests[layer] += n
        st.per_layer_hits[layer] += hits
        if layer == 0:
            st.tokens += len(ids)
        extra: dict[int, int] = {}
        t0 = time.perf_counter()
        for e in dict.fromkeys(e for row in ids for e in row):  # distinct, first-seen order
            if e in cached:
                continue
            if (layer, e) in self.pending:
                slot, fut = self.pending.pop((layer, e))
                st.bytes_read += fut.result()
                st.prefetched += 1
                st.prefetch_used += 1
            else:
                slot = self.free.pop()
                st.bytes_read += self._read(layer, e, slot)
                st.demand_loads += 1
            extra[e] = slot
        self._drop_pending(layer)  # read-ahead this layer did not use
        st.wait_s += time.perf_counter() - t0
        table = {**cached, **extra}
        slots = torch.tensor([[table[e] for e in row] for row in ids], dtype=torch.long, device=ids_TK.device)
        return slots, extra

    def release(self, layer: int, ids_TK: torch.Tensor, extra: dict[int, int]) -> None:
        """Apply the LRU update token by token; keep the top `capacity`, free the other slots."""
        stack = self.stack[layer]
        for row in ids_TK.tolist():
            for e in reversed(row):  # the first choice ends most recent
                if e in stack:
                    stack.remove(e)
                stack.insert(0, e)
        keep = set(stack[: self.capacity])
        held = {**self.slot_of[layer], **extra}
        self.slot_of[layer] = {e: s for e, s in held.items() if e in keep}
        freed = [s for e, s in held.items() if e not in keep]
        self._mark_freed(freed)
        self.free.extend(freed)
        assert set(self.slot_of[layer]) == keep, "LRU cache lost an expert it should hold"

    def prefetch_layer(self, layer: int, ids_TK: torch.Tensor) -> None:
        """Start reading the predicted experts of `layer` that it does not cache, into spare slots."""
        for e in dict.fromkeys(ids_TK.reshape(-1).tolist()):
            if e in self.slot_of[layer] or (layer, e) in self.pending or not self.free:
                continue
            slot = self.free.pop()
            self.pending[(layer, e)] = (slot, self._reader.submit(self._read, layer, e, slot))
            self.stats.prefetch_issued += 1

    def _mark_freed(self, slots: list[int]) -> None:
        """CUDA: the work queued so far on the compute stream may still read `slots`; their next read
        waits for it."""
        if self.device.type == "cuda" and slots:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            with self._lock:
                self._freed_at.update(dict.fromkeys(slots, event))

    def _drop_pending(self, layer: int) -> None:
        for key in [k for k in self.pending if k[0] == layer]:
            slot, fut = self.pending.pop(key)
            self.stats.bytes_read += fut.result()  # the slot is reusable only once its read is done
            self.free.append(slot)

    def _drain(self) -> None:
        for _, fut in self.pending.values():
            fut.result()
        self.pending.clear()

    def close(self) -> None:
        self._drain()
        self._reader.shutdown(wait=True)
