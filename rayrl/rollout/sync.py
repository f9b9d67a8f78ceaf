"""Learner -> vLLM weight broadcast over a dedicated process group, packed into flat buckets.

Rank 0 is the sender (learner rank 0); every vLLM worker is a receiver. The group never
touches torch's default process group: it is built directly from a TCPStore that some
long-lived process hosts (`host_store`, the RolloutPool does it), so vLLM's own groups and
the learner's DeepSpeed groups are left alone.

Wire protocol, per bucket, three broadcasts from rank 0:
  header  int64[2] = [metadata bytes, data bytes]   ([0, 0] ends the sync)
  meta    uint8[...] = JSON [[name, shape, dtype, offset], ...]
  data    uint8[...] = the tensors' bytes, each at its (aligned) offset
Metadata travels per bucket so the sender can stream (e.g. gather ZeRO-3 shards layer by
layer) and receivers can hand tensors to vLLM's loader as they arrive.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 64 << 20
ALIGN = 64  # offsets aligned so every dtype view of a slice is legal and SIMD-friendly


@dataclass(frozen=True)
class SyncGroup:
    """Everything a rank needs to join one sync group; sender and receivers share it."""

    master_addr: str
    master_port: int
    world_size: int  # 1 sender + every vLLM worker process
    backend: str = "gloo"  # gloo on CPU, nccl on GPU
    group_name: str = "rayrl-sync"  # store prefix: a new name per (re)connection
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"SyncGroup.backend: expected 'gloo' or 'nccl', got {self.backend!r}")


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved: payload bytes (no headers), wall seconds, tensors, buckets."""

    bytes: int
    seconds: float
    tensors: int
    buckets: int

    def metrics(self) -> dict[str, float]:
        """Columns for a metrics row."""
        return {f"sync_{k}": float(v) for k, v in asdict(self).items()}


def host_store(host: str) -> dist.TCPStore:
    """Start the rendezvous store on a free port (`.port`); keep it alive while groups are used."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)


class _Group:
    """This rank's handle on a sync group: rank 0 broadcasts, everyone else receives."""

    def __init__(self, group: SyncGroup, rank: int) -> None:
        timeout = datetime.timedelta(seconds=group.timeout_s)
        store = dist.TCPStore(
            group.master_addr, group.master_port, is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(group.group_name, store)
        self.pg: dist.ProcessGroup | None
        if group.backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, group.world_size, timeout)
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, group.world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        if self.pg is None:
            raise RuntimeError("sync group is closed (a peer failed); join a new one")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([tensor], opts)

    def close(self) -> None:
        # Destroying the group closes its sockets, so peers blocked on it fail fast
        # instead of waiting for the timeout.
        if self.pg is not None:
            self.pg.shutdown()
            self.pg = None


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _padded_size(tensor: torch.Tensor) -> int:
    return -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN


def _buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of tensors up to bucket_bytes; bucket_bytes=0 gives one tensor each."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if bucket and size + _padded_size(tensor) > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += _padded_size(tensor)
    if bucket:
        yield bucket


def _pack(
    bucket: list[tuple[str, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(JSON metadata, flat data) for one bucket; a lone tensor is sent as a view, no copy."""
    meta, offset = [], 0
    for name, tensor in bucket:
        meta.append([name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset])
        offset += _padded_size(tensor)
    if len(bucket) == 1:
        data = _as_bytes(bucket[0][1]).to(device)
    else:
        data = torch.empty(offset, dtype=torch.uint8, device=device)
        for (_, tensor), (*_, start) in zip(bucket, meta):
            raw = _as_bytes(tensor)
            data[start : start + raw.numel()].copy_(raw)
    meta_bytes = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    return meta_bytes.to(device), data


class WeightSender:
    """Rank 0 of a sync group: broadcasts named tensors to every vLLM worker.

    The constructor blocks until every receiver has joined (the pool starts them first).
    bucket_bytes=0 sends one tensor per broadcast, for comparison with bucketing.
    """

    def __init__(
        self,
        master_addr: str,
        master_port: int,
        world_size: int,
        backend: str = "gloo",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        group_name: str = "rayrl-sync",
        timeout_s: float = 600.0,
    ) -> None:
        group = SyncGroup(master_addr, master_port, world_size, backend, group_name, timeout_s)
        self.bucket_bytes = bucket_bytes
        self._group = _Group(group, rank=0)

    @classmethod
    def join(cls, group: SyncGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightSender:
        return cls(**asdict(group), bucket_bytes=bucket_bytes)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Send every tensor (HF checkpoint names); returns when all buckets are out."""
        start = time.perf_counter()
        nbytes = ntensors = nbuckets = 0
        in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        try:
            for bucket in _buckets(named_tensors, self.bucket_bytes):
                # Pack this bucket while the previous one is still on the wire.
                meta, data = _pack(bucket, self._group.device)
                self._wait(in_flight)
                in_flight = self._post(meta, data)
                nbytes += data.numel()
                ntensors += len(bucket)
                nbuckets += 1
            self._wait(in_flight)
            end = torch.zeros(2, dtype=torch.int64, device=self._group.device)
            self._group.broadcast(end).wait()
        except BaseException:
            self._group.close()
            raise
        return SyncStats(nbytes, time.perf_counter() - start, ntensors, nbuckets)

    def close(self) -> None:
        self._group.close()

    def _post(self, meta: torch.Tensor, data: torch.Tensor) -> list[tuple[dist.Work, torch.Tensor]]:
        header = torch.tensor(
            [meta.numel(), data.numel()], dtype=torch.int64, device=self._group.device
        )
        # Keep each tensor referenced until its broadcast has completed.
        return [(self._group.broadcast(t), t) for t in (header, meta, data)]

    @staticmethod
    def _wait(in_flight: list[tuple[dist.Work, torch.Tensor]]) -> None:
        for work, _ in in_flight:
            work.wait()


class WeightReceiver:
    """One vLLM worker's end of a sync group (rank >= 1)."""

    def __init__(self, group: SyncGroup, rank: int) -> None:
        self._group = _Group(group, rank)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as buckets arrive; must be exhausted to stay in step."""
        try:
            while True:
                meta_len, data_len = self._recv(2, torch.int64).tolist()
                if meta_len == 0:
                    return
                meta = json.loads(self._recv(meta_len).cpu().numpy().tobytes())
                # A fresh buffer per bucket: vLLM may hold views until a layer is complete.
                data = self._recv(data_len)
                for name, shape, dtype, offset in meta:
                    dtype = getattr(torch, dtype)
                    size = torch.Size(shape).numel() * dtype.itemsize
                    yield name, data[offset : offset + size].view(dtype).view(shape)
        except BaseException:
            self._group.close()
            raise

    def close(self) -> None:
        self._group.close()

    def _recv(self, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype, device=self._group.device)
        self._group.broadcast(buffer).wait()
        return buffer
