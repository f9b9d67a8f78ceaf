"""Weight-sync methods mixed into vLLM's worker class (`worker_extension_cls`).

They run inside each vLLM worker process (one per tensor-parallel rank) and are called
through `LLM.collective_rpc`. `self` is the vLLM worker: `self.rank` is its rank inside
the engine and `self.reload_weights` is vLLM's in-place reload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from rayrl.rollout.sync import SyncGroup, WeightReceiver


class WeightSyncExtension:
    _weight_receiver: WeightReceiver | None = None

    def join_weight_sync(self, group: SyncGroup, rank_offset: int) -> None:
        """Join a (new) sync group as rank rank_offset + this worker's rank in the engine."""
        if self._weight_receiver is not None:
            self._weight_receiver.close()
        self._weight_receiver = WeightReceiver(group, rank_offset + self.rank)

    def receive_weights(self) -> dict[str, float]:
        """Receive one sync and load it; returns the tensors and bytes received and the
        seconds vLLM spent loading them (the sync's wall time less its waits on the sender)."""
        if self._weight_receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        counts = {"tensors": 0, "bytes": 0, "wait_seconds": 0.0}
        weights = _counted(self._weight_receiver.receive(), counts)
        start = time.perf_counter()
        try:
            # Checkpoint-format load through vLLM's layerwise reload: each layer's
            # process_weights_after_loading runs again, so processed weights update too.
            # Tied lm_head.weight, if sent, is skipped by the loader (it aliases embed_tokens).
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        finally:
            for _ in weights:  # drain what the loader left, so every rank stays in step
                pass
        self._retie_lm_head()
        wait = counts.pop("wait_seconds")
        return {**counts, "load_seconds": time.perf_counter() - start - wait}

    def _retie_lm_head(self) -> None:
        """A tied lm_head loads nothing of its own, so the reload puts back its old kernel
        tensors (on CPU, a packed copy of the old embedding); point it at the new embedding
        and rebuild its processed form."""
        model = self.model_runner.model
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if (
            not getattr(model.config, "tie_word_embeddings", False)
            or lm_head is None
            or embed is None
        ):
            return
        lm_head.weight = embed.weight
        lm_head.quant_method.process_weights_after_loading(lm_head)


def _counted(
    weights: Iterator[tuple[str, torch.Tensor]], counts: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    while True:
        t0 = time.perf_counter()
        try:
            name, tensor = next(weights)
        except StopIteration:
            return
        finally:  # time in the receiver: waiting for a bucket, mapping it, the end barrier
            counts["wait_seconds"] += time.perf_counter() - t0
        counts["tensors"] += 1
        counts["bytes"] += tensor.numel() * tensor.element_size()
        yield name, tensor
