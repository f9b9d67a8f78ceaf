"""The bucketed broadcast protocol on its own: a sender and receivers in threads, gloo."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from dataclasses import replace

import pytest
import torch

from rayrl.rollout import sync
from rayrl.rollout.sync import SHM_DIR, SyncGroup, WeightReceiver, WeightSender, host_store


def _tensors(big: int = 300) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(big)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("a.bias", torch.randn(3, generator=g).to(torch.bfloat16)),  # odd size: alignment
        ("b.scale", torch.tensor(2.5, dtype=torch.float64)),  # 0-dim
        ("b.index", torch.arange(11, dtype=torch.int64)),
        ("c.weight", torch.randn(6, 4, generator=g).t()),  # non-contiguous
        ("d.big", torch.randn(big, generator=g)),  # larger than a small bucket
    ]


def _run(
    bucket_bytes: int,
    receivers: int = 2,
    syncs: int = 2,
    shm_dir: str = SHM_DIR,
    sender_shm_dir: str | None = None,
):
    store = host_store("127.0.0.1")
    name = f"t-{bucket_bytes}-{bool(shm_dir)}"
    group = SyncGroup("127.0.0.1", store.port, receivers + 1, group_name=name, shm_dir=shm_dir)
    got: list[list[list[tuple[str, torch.Tensor]]]] = [[] for _ in range(receivers)]

    def receive(rank: int) -> None:
        r = WeightReceiver(group, rank)
        for _ in range(syncs):
            got[rank - 1].append([(n, t.clone()) for n, t in r.receive()])
        r.close()

    threads = [threading.Thread(target=receive, args=(r,)) for r in range(1, receivers + 1)]
    for t in threads:
        t.start()
    sender_group = group if sender_shm_dir is None else replace(group, shm_dir=sender_shm_dir)
    sender = WeightSender.join(sender_group, bucket_bytes=bucket_bytes)
    # Each sync a little larger: the sender must replace its bucket files, the receivers remap.
    stats = [sender.send(_tensors(_big(i))) for i in range(syncs)]
    for t in threads:
        t.join(timeout=60)
    transport = sender.transport
    named = _ours(SHM_DIR)
    sender.close()
    return stats, got, transport, named


def _big(sync: int) -> int:
    return 300 + 100 * sync


def _ours(shm_dir: str) -> list[str]:
    return [n for n in os.listdir(shm_dir) if n.startswith(f"rayrl-sync-{os.getpid()}-")]


@pytest.mark.parametrize("shm_dir", [SHM_DIR, ""], ids=["shared-memory", "wire"])
@pytest.mark.parametrize("bucket_bytes", [0, 256, 1 << 20])
def test_buckets_round_trip(bucket_bytes, shm_dir):
    stats, got, transport, named = _run(bucket_bytes, shm_dir=shm_dir)
    # Threads share a node, so the probe must pick shared memory whenever it is offered.
    assert transport == ("shared memory" if shm_dir else "gloo")
    assert not named  # a finished sync leaves no names in tmpfs, only the mappings
    for per_rank in got:
        assert len(per_rank) == 2
        for i, received in enumerate(per_rank):
            sent = _tensors(_big(i))
            assert [n for n, _ in received] == [n for n, _ in sent]
            for (_, a), (_, b) in zip(received, sent):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a, b)
    s, sent = stats[0], _tensors()
    assert s.tensors == len(sent)
    assert s.bytes >= sum(t.numel() * t.element_size() for _, t in sent)
    if bucket_bytes == 0:
        assert s.buckets == len(sent)  # one tensor per broadcast
    elif bucket_bytes == 1 << 20:
        assert s.buckets == 1
    else:
        assert 1 < s.buckets < len(sent)
    assert set(s.metrics()) == {
        "sync_bytes",
        "sync_seconds",
        "sync_tensors",
        "sync_buckets",
        "sync_load_seconds",
    }


def test_a_full_or_missing_shm_dir_falls_back_to_the_wire(monkeypatch, tmp_path):
    _, got, transport, _ = _run(256, shm_dir=str(tmp_path / "absent"))
    assert transport == "gloo"
    # No room left: every bucket goes over the wire, the weights still arrive intact.
    wired: list[str | None] = []
    encode = sync._encode
    monkeypatch.setattr(sync, "_encode", lambda m, p, d: wired.append(p) or encode(m, p, d))
    monkeypatch.setattr(sync.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 0))
    _, got, transport, _ = _run(256, shm_dir=str(tmp_path))
    assert transport == "shared memory" and wired and set(wired) == {None}
    for i, received in enumerate(got[0]):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received, _tensors(_big(i))))


def test_the_senders_shm_dir_decides_for_the_group():
    # Receivers that offer shared memory follow a sender that keeps to the wire.
    _, got, transport, _ = _run(256, sender_shm_dir="")
    assert transport == "gloo"
    for i, received in enumerate(got[0]):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(received, _tensors(_big(i))))


def test_unknown_backend_names_the_field():
    with pytest.raises(ValueError, match="SyncGroup.backend"):
        SyncGroup("127.0.0.1", 29500, 2, "mpi")


def test_a_lost_receiver_fails_the_sync_fast():
    """A dead peer must not leave the sender or the other receivers waiting for the timeout."""
    store = host_store("127.0.0.1")
    group = SyncGroup("127.0.0.1", store.port, 3, group_name="lost", timeout_s=120)
    errors: dict[int, BaseException] = {}

    def receive(rank: int) -> None:
        r = WeightReceiver(group, rank)
        if rank == 2:
            r.close()  # as if its process died
            return
        try:
            list(r.receive())
        except RuntimeError as e:
            errors[rank] = e

    threads = [threading.Thread(target=receive, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender = WeightSender.join(group, bucket_bytes=0)
    start = time.perf_counter()
    with pytest.raises(RuntimeError):
        sender.send(_tensors())
    for t in threads:
        t.join(timeout=60)
    assert 1 in errors
    assert time.perf_counter() - start < 30
    assert not _ours(SHM_DIR)  # a failed sync leaves no bucket files behind


def test_a_dropped_senders_files_go_with_it(tmp_path):
    buckets = sync._SharedBuckets(str(tmp_path))
    assert buckets.get(0, 64) is not None and len(list(tmp_path.iterdir())) == 1
    del buckets
    gc.collect()
    assert not list(tmp_path.iterdir())
