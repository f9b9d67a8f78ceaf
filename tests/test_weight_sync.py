"""The bucketed broadcast protocol on its own: a sender and receivers in threads, gloo."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rayrl.rollout.sync import SyncGroup, WeightReceiver, WeightSender, host_store


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("a.bias", torch.randn(3, generator=g).to(torch.bfloat16)),  # odd size: alignment
        ("b.scale", torch.tensor(2.5, dtype=torch.float64)),  # 0-dim
        ("b.index", torch.arange(11, dtype=torch.int64)),
        ("c.weight", torch.randn(6, 4, generator=g).t()),  # non-contiguous
        ("d.big", torch.randn(300, generator=g)),  # larger than a small bucket
    ]


def _run(bucket_bytes: int, receivers: int = 2, syncs: int = 2):
    store = host_store("127.0.0.1")
    group = SyncGroup("127.0.0.1", store.port, receivers + 1, group_name=f"t-{bucket_bytes}")
    got: list[list[list[tuple[str, torch.Tensor]]]] = [[] for _ in range(receivers)]

    def receive(rank: int) -> None:
        r = WeightReceiver(group, rank)
        for _ in range(syncs):
            got[rank - 1].append([(n, t.clone()) for n, t in r.receive()])
        r.close()

    threads = [threading.Thread(target=receive, args=(r,)) for r in range(1, receivers + 1)]
    for t in threads:
        t.start()
    sender = WeightSender.join(group, bucket_bytes=bucket_bytes)
    stats = [sender.send(_tensors()) for _ in range(syncs)]
    for t in threads:
        t.join(timeout=60)
    sender.close()
    return stats, got


@pytest.mark.parametrize("bucket_bytes", [0, 256, 1 << 20])
def test_buckets_round_trip(bucket_bytes):
    stats, got = _run(bucket_bytes)
    sent = _tensors()
    for per_rank in got:
        assert len(per_rank) == 2
        for received in per_rank:
            assert [n for n, _ in received] == [n for n, _ in sent]
            for (_, a), (_, b) in zip(received, sent):
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a, b)
    s = stats[0]
    assert s.tensors == len(sent)
    assert s.bytes >= sum(t.numel() * t.element_size() for _, t in sent)
    if bucket_bytes == 0:
        assert s.buckets == len(sent)  # one tensor per broadcast
    elif bucket_bytes == 1 << 20:
        assert s.buckets == 1
    else:
        assert 1 < s.buckets < len(sent)
    assert set(s.metrics()) == {"sync_bytes", "sync_seconds", "sync_tensors", "sync_buckets"}


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
