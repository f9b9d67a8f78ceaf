"""Learner -> vLLM weight broadcast over a dedicated process group, packed into flat buckets.

Rank 0 is the sender (learner rank 0); every vLLM worker is a receiver. The group never
touches torch's default process group: it is built directly from a TCPStore that some
long-lived process hosts (`host_store`, the RolloutPool does it), so vLLM's own groups and
the learner's DeepSpeed groups are left alone.

Wire protocol, per bucket, three broadcasts from rank 0:
  header  int64[2] = [metadata bytes, data bytes]   ([0, 0] ends the sync)
  meta    uint8[...] = JSON {"tensors": [[name, shape, dtype, offset], ...], "path": P}
  data    uint8[...] = the tensors' bytes, each at its (aligned) offset
Metadata travels per bucket so the sender can stream (e.g. gather ZeRO-3 shards layer by
layer) and receivers can hand tensors to vLLM's loader as they arrive.

Same node: when every rank sees the sender's shared-memory directory (checked once per
group with a probe file, so two containers on one host are not mistaken for one), the data
is written to a file there (path P, one per bucket slot, reused across syncs) instead of the
wire, and receivers load straight from its mapping: gloo only carries header and metadata.
A bucket that does not fit in the directory's free space goes over the wire (P is null).
"""

from __future__ import annotations

import datetime
import glob
import itertools
import json
import logging
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 64 << 20
SHM_DIR = "/dev/shm"
_PROBE_BYTES = 256  # room for the probe file's path
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
    shm_dir: str = SHM_DIR  # same-node buckets go through files here; "" keeps them on the wire

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"SyncGroup.backend: expected 'gloo' or 'nccl', got {self.backend!r}")


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved: payload bytes (no headers), wall seconds, tensors, buckets, and
    the seconds the slowest vLLM worker spent loading them (the rollout pool fills it in)."""

    bytes: int
    seconds: float
    tensors: int
    buckets: int
    load_seconds: float = 0.0

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
        # NCCL moves GPU memory faster than a host round trip would: shared memory is CPU only.
        # Every rank probes, so the sender's shm_dir alone decides ("" offers no file).
        self.shared = group.backend == "gloo" and self._probe(group, rank)

    def _probe(self, group: SyncGroup, rank: int) -> bool:
        """Whether every rank sees a file the sender creates in group.shm_dir."""
        path = torch.zeros(_PROBE_BYTES, dtype=torch.uint8)
        probe = ""
        if rank == 0 and group.shm_dir and os.path.isdir(group.shm_dir):
            probe = os.path.join(group.shm_dir, f"rayrl-probe-{uuid.uuid4().hex}")
            open(probe, "wb").close()
            path[: len(probe)] = torch.frombuffer(bytearray(probe.encode()), dtype=torch.uint8)
        try:
            self.broadcast(path).wait()
            seen = path.numpy().tobytes().rstrip(b"\0").decode()
            ok = torch.tensor([int(bool(seen) and os.path.exists(seen))], dtype=torch.int64)
            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.MIN
            self.pg.allreduce([ok], opts).wait()
        finally:
            if probe:
                os.unlink(probe)
        return bool(ok.item())

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        if self.pg is None:
            raise RuntimeError("sync group is closed (a peer failed); join a new one")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([tensor], opts)

    def done(self) -> None:
        """End of a sync. In shared memory every rank waits for all: the sender's next sync
        must not overwrite a bucket file that a receiver is still reading."""
        if self.shared:
            opts = dist.AllreduceOptions()
            self.pg.allreduce([torch.zeros(1)], opts).wait()

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


def _layout(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[list], int]:
    """Each tensor's [name, shape, dtype, offset] in the bucket, and the bucket's size."""
    meta, offset = [], 0
    for name, tensor in bucket:
        meta.append([name, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), offset])
        offset += _padded_size(tensor)
    return meta, offset


def _fill(data: torch.Tensor, bucket: list[tuple[str, torch.Tensor]], meta: list[list]) -> None:
    for (_, tensor), (*_, start) in zip(bucket, meta):
        raw = _as_bytes(tensor)
        data[start : start + raw.numel()].copy_(raw)


def _encode(meta: list[list], path: str | None, device: torch.device) -> torch.Tensor:
    raw = json.dumps({"tensors": meta, "path": path}).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def _map(path: str, nbytes: int) -> torch.Tensor:
    """A file in shared memory as a flat uint8 tensor (MAP_SHARED: no copy on either side)."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class _SharedBuckets:
    """The sender's bucket files in shared memory, one per bucket slot, kept across syncs.

    A file is unlinked once every receiver has mapped it: the mappings keep the memory, and
    no name is left in tmpfs (which outlives the process) should the sender be killed."""

    def __init__(self, shm_dir: str) -> None:
        # Unique per sender: two senders in one process (a pool rebuilt) must not share files.
        self.prefix = os.path.join(shm_dir, f"rayrl-sync-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.dir = shm_dir
        self.slots: dict[int, tuple[str, torch.Tensor]] = {}
        self.fresh: list[str] = []  # files made in this sync, named until the receivers map them
        self._made = itertools.count()  # a fresh name per file: receivers map by name
        self._finalizer = weakref.finalize(self, _unlink_all, self.prefix)

    def get(self, slot: int, nbytes: int) -> tuple[str, torch.Tensor] | None:
        """The slot's mapped file of nbytes; None where the directory lacks the room."""
        held = self.slots.get(slot)
        if held is not None and held[1].numel() == nbytes:
            return held
        self.slots.pop(slot, None)
        # A write past tmpfs's free space kills the writer with SIGBUS: check first.
        if shutil.disk_usage(self.dir).free < nbytes:
            return None
        path = f"{self.prefix}-{next(self._made)}"
        with open(path, "wb") as f:
            f.truncate(nbytes)
        self.fresh.append(path)
        self.slots[slot] = path, _map(path, nbytes)
        return self.slots[slot]

    def release(self) -> None:
        """After a sync's barrier: every receiver holds its mapping, so drop the names."""
        for path in self.fresh:
            os.unlink(path)
        self.fresh.clear()

    def close(self) -> None:
        self.slots.clear()
        self.fresh.clear()
        self._finalizer()


def _unlink_all(prefix: str) -> None:
    for path in glob.glob(f"{prefix}-*"):  # the files of a sync that did not finish
        os.unlink(path)


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
        shm_dir: str = SHM_DIR,
    ) -> None:
        group = SyncGroup(
            master_addr, master_port, world_size, backend, group_name, timeout_s, shm_dir
        )
        self.bucket_bytes = bucket_bytes
        self._group = _Group(group, rank=0)
        self._shm = _SharedBuckets(shm_dir) if self._group.shared else None
        # The transport this group uses, chosen by the probe: "shared memory" or the backend.
        self.transport = "shared memory" if self._shm else backend
        log.info("weight sync %s: %s", group_name, self.transport)

    @classmethod
    def join(cls, group: SyncGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> WeightSender:
        return cls(**asdict(group), bucket_bytes=bucket_bytes)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Send every tensor (HF checkpoint names); returns when all buckets are out."""
        start = time.perf_counter()
        nbytes = ntensors = nbuckets = 0
        in_flight: list[tuple[dist.Work, torch.Tensor]] = []
        try:
            for slot, bucket in enumerate(_buckets(named_tensors, self.bucket_bytes)):
                layout, size = _layout(bucket)
                shared = self._shm.get(slot, size) if self._shm else None
                if shared is None and len(bucket) == 1:  # a lone tensor goes as a view, no copy
                    data = _as_bytes(bucket[0][1]).to(self._group.device)
                else:
                    # Pack this bucket while the previous one is still on the wire.
                    data = (
                        shared[1]
                        if shared
                        else torch.empty(size, dtype=torch.uint8, device=self._group.device)
                    )
                    _fill(data, bucket, layout)
                meta = _encode(layout, shared and shared[0], self._group.device)
                self._wait(in_flight)
                in_flight = self._post(meta, data, wire=shared is None)
                nbytes += data.numel()
                ntensors += len(bucket)
                nbuckets += 1
            self._wait(in_flight)
            end = torch.zeros(2, dtype=torch.int64, device=self._group.device)
            self._group.broadcast(end).wait()
            self._group.done()
            if self._shm:
                self._shm.release()
        except BaseException:
            self.close()
            raise
        return SyncStats(nbytes, time.perf_counter() - start, ntensors, nbuckets)

    def close(self) -> None:
        self._group.close()
        if self._shm:
            self._shm.close()

    def _post(
        self, meta: torch.Tensor, data: torch.Tensor, wire: bool
    ) -> list[tuple[dist.Work, torch.Tensor]]:
        header = torch.tensor(
            [meta.numel(), data.numel()], dtype=torch.int64, device=self._group.device
        )
        # Keep each tensor referenced until its broadcast has completed.
        sent = (header, meta, data) if wire else (header, meta)
        return [(self._group.broadcast(t), t) for t in sent]

    @staticmethod
    def _wait(in_flight: list[tuple[dist.Work, torch.Tensor]]) -> None:
        for work, _ in in_flight:
            work.wait()


class WeightReceiver:
    """One vLLM worker's end of a sync group (rank >= 1)."""

    def __init__(self, group: SyncGroup, rank: int) -> None:
        self._group = _Group(group, rank)
        self._maps: dict[str, torch.Tensor] = {}  # the sender's bucket files, mapped once

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as buckets arrive; must be exhausted to stay in step."""
        used: set[str] = set()
        try:
            while True:
                meta_len, data_len = self._recv(2, torch.int64).tolist()
                if meta_len == 0:
                    # A file this sync did not use was replaced (or dropped) by the sender.
                    self._maps = {p: m for p, m in self._maps.items() if p in used}
                    self._group.done()
                    return
                meta = json.loads(self._recv(meta_len).cpu().numpy().tobytes())
                if path := meta["path"]:
                    used.add(path)
                    data = self._mapped(path, data_len)
                else:
                    # A fresh buffer per bucket: vLLM may hold views until a layer is complete.
                    data = self._recv(data_len)
                for name, shape, dtype, offset in meta["tensors"]:
                    dtype = getattr(torch, dtype)
                    size = torch.Size(shape).numel() * dtype.itemsize
                    yield name, data[offset : offset + size].view(dtype).view(shape)
        except BaseException:
            self._group.close()
            raise

    def close(self) -> None:
        self._group.close()

    def _mapped(self, path: str, nbytes: int) -> torch.Tensor:
        if path not in self._maps:  # a new file: the sender made or resized a bucket
            self._maps[path] = _map(path, nbytes)
        return self._maps[path]

    def _recv(self, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype, device=self._group.device)
        self._group.broadcast(buffer).wait()
        return buffer
