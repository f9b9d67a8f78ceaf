"""One DeepSpeed learner rank: policy update, reference model, checkpoint, weight sync.

LearnerGroup (group.py) starts `world_size` of these as Ray actors that form one
torch.distributed group (gloo on CPU, NCCL on GPU); DeepSpeed ZeRO shards the optimizer.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from rayrl.config import GRPOConfig, ResourcesConfig
from rayrl.learner.batch import Padded, TrainItem, collate, split_even
from rayrl.learner.grpo import grpo_loss, token_logprobs


def grad_accumulation_steps(grpo: GRPOConfig, rollout_n: int, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (fixed for a run, as DeepSpeed wants)."""
    mini_batch = grpo.prompts_per_step // grpo.mini_batches * rollout_n
    smallest_shard = mini_batch // world_size
    return max(1, math.ceil(smallest_shard / grpo.micro_batch))


class Learner:
    def __init__(
        self,
        rank: int,
        world_size: int,
        model_path: str,
        grpo: GRPOConfig,
        resources: ResourcesConfig,
        rollout_n: int,
    ) -> None:
        self.rank, self.world_size, self.model_path = rank, world_size, model_path
        self.grpo, self.resources, self.rollout_n = grpo, resources, rollout_n
        self.gpu = resources.device == "gpu"
        self.device = torch.device("cuda", 0) if self.gpu else torch.device("cpu")
        self.sender = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the group."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the learner group and build the DeepSpeed engine; returns micro-batches per step."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        grpo = self.grpo
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        deepspeed.init_distributed(dist_backend="nccl" if self.gpu else "gloo")
        torch.manual_seed(grpo.seed + self.rank)
        dtype = torch.bfloat16 if self.gpu else torch.float32
        policy = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.ref = (
            AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            .to(self.device)
            .eval()
        )
        self.ref.requires_grad_(False)
        self.pad_id = policy.config.pad_token_id or 0
        self.gas = grad_accumulation_steps(grpo, self.rollout_n, self.world_size)
        ds_config = {
            "train_micro_batch_size_per_gpu": grpo.micro_batch,
            "gradient_accumulation_steps": self.gas,
            "train_batch_size": grpo.micro_batch * self.gas * self.world_size,
            "gradient_clipping": grpo.grad_clip,
            "zero_optimization": {"stage": self.resources.zero_stage},
            "bf16": {"enabled": self.gpu},
            "steps_per_print": 10**9,
        }
        # A client optimizer: FusedAdam needs CUDA, torch's AdamW runs on both.
        opt = torch.optim.AdamW(policy.parameters(), lr=grpo.lr, weight_decay=grpo.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, config=ds_config)
        return self.gas

    def _logprobs(self, model: Any, b: Padded, temperature: float) -> torch.Tensor:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        return token_logprobs(logits, b.input_ids[:, 1:], temperature)

    def train(
        self, mini_batches: list[list[TrainItem]], denoms: list[float], temperature: float
    ) -> dict[str, float]:
        """One rollout batch: `ppo_epochs` passes over its mini-batches, one optimizer step each.

        mini_batches are this rank's shards of the batch's mini-batches; denoms their
        loss denominators over every rank (`loss_denominator`), so the update is the same
        whatever the number of ranks. Returns sums of the statistics (maxima for *_max).
        """
        t0 = time.perf_counter()
        g = self.grpo
        sums: dict[str, float] = defaultdict(float)
        self.engine.train()
        # pi_old and pi_ref: once per rollout batch, before the first update.
        batches = []
        with torch.no_grad():
            for shard in mini_batches:
                chunks = []
                for chunk in split_even(shard, self.gas):
                    b = collate(chunk, self.pad_id).to(self.device)
                    old = self._logprobs(self.engine, b, temperature)
                    chunks.append((b, old, self._logprobs(self.ref, b, temperature)))
                    # The behaviour policy (vLLM's sampler) against the learner's pi_old.
                    diff = (old - b.rollout_logp).abs()[b.rollout_logp.isfinite()]
                    sums["logp_diff"] += float(diff.sum())
                    sums["logp_diff_tokens"] += diff.numel()
                    top = float(diff.max()) if diff.numel() else 0.0
                    sums["logp_diff_max"] = max(sums["logp_diff_max"], top)
                    sums["forward_tokens"] += int(b.attention_mask.sum())
                batches.append(chunks)
        for _ in range(g.ppo_epochs):
            for chunks, denom in zip(batches, denoms):
                for i, (b, old, ref) in enumerate(chunks):
                    # The optimizer steps on the mini-batch's last micro-batch, set here rather
                    # than left to DeepSpeed's running micro-step count.
                    self.engine.set_gradient_accumulation_boundary(i == len(chunks) - 1)
                    logp = self._logprobs(self.engine, b, temperature)
                    loss, stats = grpo_loss(logp, old, ref, b.advantages, b.response_mask, g, denom)
                    # DeepSpeed averages gradients over ranks, and each rank's loss is its part
                    # of the batch's sum: scaled back up, the update is the global one.
                    self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    self.engine.step()
                    sums["loss"] += loss.item()
                    sums["tokens_processed"] += int(b.attention_mask.sum())
                    sums["ratio_max"] = max(sums["ratio_max"], stats.pop("ratio_max"))
                    for k, v in stats.items():
                        sums[k] += v
        grad_norm = self.engine.get_global_grad_norm()  # of the last update
        sums["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        sums["seconds"] = time.perf_counter() - t0
        return dict(sums)

    def named_weights(self):
        """Full (gathered) weights by HF name; ZeRO-3 shards need a gather first."""
        import deepspeed

        params = list(self.engine.module.named_parameters())
        if self.engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                return [(n, p.detach().cpu().clone()) for n, p in params]
        return [(n, p.detach()) for n, p in params]

    # --- weight sync (rank 0 only) -------------------------------------------------
    def init_weight_sync(self, **kwargs: Any) -> None:
        from rayrl.rollout.sync import WeightSender

        self.sender = WeightSender(**kwargs)

    def sync_weights(self) -> Any:
        """Every rank gathers (a collective under ZeRO-3); rank 0 alone sends. Returns SyncStats on rank 0."""
        weights = self.named_weights()
        return self.sender.send(weights) if self.sender is not None else None

    # --- checkpoints ------------------------------------------------------------------
    def save(self, path: str, tag: str) -> None:
        self.engine.save_checkpoint(path, tag=tag)

    def load(self, path: str, tag: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag=tag)
        if loaded is None:
            raise FileNotFoundError(f"{Path(path) / tag}: no DeepSpeed checkpoint to resume from")
