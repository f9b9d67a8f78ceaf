"""One DeepSpeed learner rank: policy update, reference model, checkpoint, weight sync.

LearnerGroup (group.py) starts `world_size` of these as Ray actors that form one
torch.distributed group (gloo on CPU, NCCL on GPU); DeepSpeed ZeRO shards the optimizer.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from rayrl.config import GRPOConfig, ResourcesConfig
from rayrl.learner.batch import Padded, TrainItem, collate, length
from rayrl.learner.grpo import grpo_loss, is_weights, off_policy, token_logprobs
from rayrl.learner.stats import merge


def grad_accumulation_steps(grpo: GRPOConfig, rollout_n: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (fixed for a run, as DeepSpeed wants)."""
    mini_batch = grpo.prompts_per_step // grpo.mini_batches * rollout_n
    smallest_shard = mini_batch // world_size
    return max(1, math.ceil(smallest_shard / grpo.micro_batch))


def old_forward_mini_batches(grpo: GRPOConfig) -> range:
    """The mini-batches whose pi_old needs a forward of its own, before the first update.
    Not the first: its training forwards in epoch 0 come before any update moves the
    weights, so their detached log-probs are pi_old exactly (as TRL's at num_iterations 1,
    veRL's for one mini-batch), whatever the epochs, the staleness or the IS weights (which
    need pi_old and vLLM's log-probs only). One mini-batch: no pi_old forward at all."""
    return range(1, grpo.mini_batches)


def learner_clips(resources: ResourcesConfig) -> bool:
    """Does the learner clip the gradient itself? DeepSpeed's ZeRO and bf16 optimizers clip
    and report the global norm; at stage 0 in fp32 it would clip and report none."""
    return resources.learner_zero_stage == 0 and not resources.engine_bf16


def deepspeed_config(
    grpo: GRPOConfig, resources: ResourcesConfig, gas: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed engine's config for one learner rank."""
    return {
        "train_micro_batch_size_per_gpu": grpo.micro_batch,
        "gradient_accumulation_steps": gas,
        "train_batch_size": grpo.micro_batch * gas * world_size,
        "gradient_clipping": 0.0 if learner_clips(resources) else grpo.grad_clip,
        "zero_optimization": {"stage": resources.learner_zero_stage},
        "bf16": {"enabled": resources.engine_bf16},
        "steps_per_print": 10**9,
    }


class Learner:
    def __init__(
        self, rank: int, world_size: int, grpo: GRPOConfig, resources: ResourcesConfig
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.grpo, self.resources = grpo, resources
        self.off_policy = off_policy(grpo, resources)  # TIS-weight the policy gradient
        self.gpu = resources.device == "gpu"
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        # bf16 matmuls over fp32 weights and optimizer states on CPU (resources.learner_dtype)
        self.autocast = resources.learner_bf16 and not self.gpu
        self.old_forwards = old_forward_mini_batches(grpo)
        self.clips = learner_clips(resources)
        self.sender = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the group."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master: tuple[str, int], model_path: str, rollout_n: int) -> int:
        """Join the learner group at `master` (rank 0's address) and build the engine."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        # DeepSpeed's shared-memory all-reduce kernel serves only its inference path, and its
        # JIT C++ build took 45-60 s on a machine's first learner: never build it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if self.gpu else "gloo")
        return self.build(model_path, rollout_n)

    def build(self, model_path: str, rollout_n: int) -> int:
        """The DeepSpeed engine of a new run, from `model_path`'s weights with a fresh
        optimizer, as a cold start builds it (a warm pool's next run calls it again).
        Returns micro-batches per step."""
        import gc

        import deepspeed
        from transformers import AutoModelForCausalLM

        grpo = self.grpo
        self.engine = self.ref = self._hf_ds = None
        gc.collect()  # the last run's engine, before a second copy is built
        torch.manual_seed(grpo.seed + self.rank)
        dtype = torch.bfloat16 if self.resources.engine_bf16 else torch.float32
        self.gas = grad_accumulation_steps(grpo, rollout_n, self.world_size)
        ds_config = deepspeed_config(grpo, self.resources, self.gas, self.world_size)
        zero3 = self.resources.learner_zero_stage == 3
        if zero3:
            from transformers.integrations import HfDeepSpeedConfig

            # While this object lives, from_pretrained builds under zero.Init and loads each
            # weight into its shard: no rank ever holds the whole model.
            self._hf_ds = HfDeepSpeedConfig(ds_config)
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if self.resources.gradient_checkpointing:
            # Non-reentrant: the form that works with ZeRO-3's parameter hooks.
            policy.gradient_checkpointing_enable({"use_reentrant": False})
        if grpo.kl_coef != 0:  # at kl_coef 0 no reference: not built, never run
            ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
            ref.requires_grad_(False)
            if zero3:  # the reference is sharded too: a ZeRO-3 engine with no optimizer
                self.ref, *_ = deepspeed.initialize(model=ref, config=ds_config)
                self.ref.eval()
            else:
                self.ref = ref.to(self.device)
        self.pad_id = policy.config.pad_token_id or 0
        # A client optimizer: FusedAdam needs CUDA, torch's AdamW runs on both.
        opt = torch.optim.AdamW(policy.parameters(), lr=grpo.lr, weight_decay=grpo.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=ds_config)
        if self.world_size == 1 and self.engine.zero_optimization_stage() == 0:
            # an all-reduce over one rank: a flatten, a copy and back, at every update
            self.engine.enable_backward_allreduce = False
        return self.gas

    def _logprobs(self, model: Any, b: Padded, temperature: float) -> torch.Tensor:
        cast = torch.autocast("cpu", torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with cast:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        return token_logprobs(logits, b.input_ids[:, 1:], temperature)

    def train(
        self, mini_batches: list[list[list[TrainItem]]], denoms: list[float], temperature: float
    ) -> dict[str, float]:
        """One rollout batch: `ppo_epochs` passes over its mini-batches, one optimizer step each.

        mini_batches are this rank's shards of the batch's mini-batches, each cut into
        micro-batches (`batch.micro_batches`: as many on every rank; an empty one is a
        zero-loss forward); denoms their loss denominators over every rank
        (`loss_denominator`), so the update is the same whatever the ranks and the cut.
        Returns the parts of the step's statistics (rayrl/learner/stats.py), merged.
        """
        t0 = time.perf_counter()
        g = self.grpo
        parts: list[dict[str, float]] = []  # per micro-batch, merged at the end
        seconds = dict.fromkeys(("time_learn_logprobs", "time_learn_fwd_bwd"), 0.0)
        seconds["time_learn_optimizer"] = 0.0
        updates = len(mini_batches) * g.ppo_epochs
        filler = TrainItem([self.pad_id] * 2, [], 0.0)  # no response tokens: zero loss
        micros = [[mb or [filler] for mb in micro] for micro in mini_batches]
        batches = [[collate(mb, self.pad_id).to(self.device) for mb in micro] for micro in micros]
        self.engine.train()
        # pi_old and pi_ref: once per rollout batch, before the first update; pi_old only where
        # it is not the training forward (`old_forward_mini_batches`), pi_ref at kl_coef > 0.
        before = []
        t = time.perf_counter()
        with torch.no_grad():
            everything = [mb for micro in micros for mb in micro]
            own = [mb for j, micro in enumerate(micros) if j in self.old_forwards for mb in micro]
            olds = iter(self._forward_only(self.engine, own, temperature))
            refs = iter(
                [] if self.ref is None else self._forward_only(self.ref, everything, temperature)
            )
            for j, micro in enumerate(batches):
                before.append([])
                for b in micro:
                    old = next(olds) if j in self.old_forwards else None
                    ref = None if self.ref is None else next(refs)
                    passes = (old is not None) + (ref is not None)
                    parts.append({"forward_tokens": passes * int(b.attention_mask.sum())})
                    before[-1].append((old, ref))
        seconds["time_learn_logprobs"] = time.perf_counter() - t
        grad_norm = float("nan")
        for epoch in range(g.ppo_epochs):
            for micro, pre, denom in zip(batches, before, denoms):
                for i, (b, (old, ref)) in enumerate(zip(micro, pre)):
                    t = time.perf_counter()
                    # The optimizer steps on the mini-batch's last micro-batch, set here rather
                    # than left to DeepSpeed's running micro-step count.
                    boundary = i == len(micro) - 1
                    self.engine.set_gradient_accumulation_boundary(boundary)
                    logp = self._logprobs(self.engine, b, temperature)
                    if old is None:  # the first mini-batch, no update yet: pi_old = pi
                        old = logp.detach()
                        pre[i] = (old, ref)  # kept for the later epochs
                    ref = logp.detach() if ref is None else ref  # kl_coef 0: KL term 0
                    w = is_weights(old, b.rollout_logp, g.is_cap) if self.off_policy else None
                    if epoch == 0:
                        parts.append(self._behaviour_stats(old, b))
                    loss, stats = grpo_loss(
                        logp, old, ref, b.advantages, b.response_mask, g, denom, w
                    )
                    # DeepSpeed averages gradients over ranks, and each rank's loss is its part
                    # of the batch's sum: scaled back up, the update is the global one.
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    t1 = time.perf_counter()
                    if boundary and self.clips:  # the gradients are reduced over ranks by now
                        grad_norm = self._clip()
                    self.engine.step()
                    seconds["time_learn_optimizer"] += time.perf_counter() - t1
                    seconds["time_learn_fwd_bwd"] += t1 - t
                    slots = b.attention_mask.numel()
                    tokens = int(b.attention_mask.sum())
                    stats |= {
                        "loss": loss.item() / updates,  # mean over the step's updates
                        "tokens_processed": tokens,
                        "pad_frac": slots - tokens,  # padding / B x T, over every forward
                        "slots": slots,
                    }
                    parts.append(stats)
        if not self.clips:
            norm = self.engine.get_global_grad_norm()  # of the last update
            grad_norm = float(norm) if norm is not None else grad_norm
        parts.append(seconds | {"grad_norm": grad_norm, "seconds": time.perf_counter() - t0})
        return merge(parts)

    def _forward_only(
        self, model: Any, micro: list[list[TrainItem]], temperature: float
    ) -> list[torch.Tensor]:
        """Each micro-batch's log-probs, without gradients, consecutive micro-batches forwarded
        together up to grpo.micro_batch samples (or micro_batch_tokens): a forward that keeps
        no activations for a backward fits the bound a forward+backward does, and on CPU a
        larger matmul runs faster (the paper's 4 updates at 25M: 8 samples a mini-batch, 32 a
        micro-batch). Right padding and the causal mask leave each row's log-probs as its own
        micro-batch's. Under ZeRO-3 a forward is a collective: each micro-batch goes alone,
        as many as on every other rank."""
        g = self.grpo

        def fits(items: list[TrainItem]) -> bool:
            if self.resources.learner_zero_stage == 3:
                return False
            if g.micro_batch_tokens:
                return len(items) * max(map(length, items)) <= g.micro_batch_tokens
            return len(items) <= g.micro_batch

        chunks: list[list[list[TrainItem]]] = []
        for mb in micro:
            if chunks and fits([it for m in chunks[-1] for it in m] + mb):
                chunks[-1].append(mb)
            else:
                chunks.append([mb])
        out = []
        for chunk in chunks:
            b = collate([it for mb in chunk for it in mb], self.pad_id).to(self.device)
            logp, row = self._logprobs(model, b, temperature), 0
            for mb in chunk:  # its rows, its own width (longest item - 1 targets)
                out.append(logp[row : row + len(mb), : max(map(length, mb)) - 1])
                row += len(mb)
        return out

    def _clip(self) -> float:
        """The global gradient norm before clipping, the gradients then scaled to at most
        grpo.grad_clip (the paper's max_grad_norm; 0: no clip)."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        # ||g|| = sqrt(sum over every gradient of ||g_i||^2); g <- g * min(1, c / ||g||)
        norm = torch.nn.utils.clip_grad_norm_(params, self.grpo.grad_clip or math.inf)
        return float(norm)

    @staticmethod
    def _behaviour_stats(old: torch.Tensor, b: Padded) -> dict[str, float]:
        """The behaviour policy (vLLM's sampler) against the learner's pi_old."""
        diff = (old - b.rollout_logp).abs()[b.rollout_logp.isfinite()]
        return {
            "logp_diff_mean": float(diff.sum()),
            "logp_diff_tokens": diff.numel(),
            "logp_diff_max": float(diff.max()) if diff.numel() else 0.0,
        }

    def stream_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights by HF name, one module at a time. Under ZeRO-3 each module
        is gathered (a collective: every rank iterates in the same order), copied out and
        freed, so a rank holds at most one module gathered plus what its consumer keeps."""
        import deepspeed

        params = list(self.engine.module.named_parameters())
        if self.engine.zero_optimization_stage() != 3:
            yield from ((n, p.detach()) for n, p in params)
            return
        for _, group in groupby(params, key=lambda np_: np_[0].rsplit(".", 1)[0]):
            group = list(group)
            with deepspeed.zero.GatheredParameters([p for _, p in group]):
                for n, p in group:
                    yield n, p.detach().clone()

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every weight at once, as CPU copies, for checks against a reference model. Copies:
        under ZeRO a parameter is a view into one flat buffer, and Ray would pickle the whole
        buffer with each view."""
        return [(n, t.to("cpu", copy=True)) for n, t in self.stream_weights()]

    def resident_param_bytes(self) -> int:
        """Bytes of policy and reference parameters this rank holds (its shards under ZeRO-3)."""
        total = 0
        for model in (m for m in (self.engine.module, self.ref) if m is not None):
            for p in model.parameters():
                # ZeRO-3 keeps the shard in ds_tensor and frees p.data, except for the small
                # parameters it keeps whole on every rank (stage3_param_persistence_threshold).
                shard = getattr(p, "ds_tensor", None)
                total += p.data.numel() * p.element_size()
                total += shard.numel() * shard.element_size() if shard is not None else 0
        return total

    # --- weight sync (rank 0 only) -------------------------------------------------
    def init_weight_sync(self, **kwargs: Any) -> None:
        from rayrl.rollout.sync import WeightSender

        if self.sender is not None:  # a rebuilt rollout pool: drop the old group and its files
            self.sender.close()
        self.sender = WeightSender(**kwargs)

    def sync_weights(self) -> Any:
        """Every rank streams (gathers under ZeRO-3); rank 0 alone sends, bucket by bucket.
        Returns SyncStats on rank 0."""
        weights = self.stream_weights()
        if self.sender is None:
            for _ in weights:  # take part in every gather, keep nothing
                pass
            return None
        return self.sender.send(weights)

    # --- checkpoints ------------------------------------------------------------------
    def save(self, path: str, tag: str) -> None:
        self.engine.save_checkpoint(path, tag=tag)

    def load(self, path: str, tag: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag=tag)
        if loaded is None:
            raise FileNotFoundError(f"{Path(path) / tag}: no DeepSpeed checkpoint to resume from")
