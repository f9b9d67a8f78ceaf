"""One GRPO step: rayrl's Run (vLLM + RewardPool + DeepSpeed + sync) against TRL's
GRPOTrainer (HF generate, in-process reward, one process), same model, batch, group
size, lengths, learning rate and number of steps, on the synthetic task.

    .venv/bin/python tools/bench_grpo.py [--models ladder,rand-25m,rand-150m] [--steps 3]
        [--paper-models rand-25m]

A model may carry its own step count, as in --models tiny-5:16,rand-25m: a 0.1 s step needs
more of them than a 4 s one for a steady mean.

Two regimes, one row each, both sides in one invocation (`updates_per_step`), both with
the KL loss at the same coefficient (SETTINGS kl: rayrl grpo.kl_coef, TRL beta), so both
build a reference model and run its forward over every sample. The forwards, per step:
- 1 update a step (every model): rayrl grpo.mini_batches 1 against TRL's defaults
  (steps_per_generation = gradient_accumulation_steps = 1, num_iterations 1).
  TRL: reference forward, one forward+backward, one optimizer step; no pi_old forward (its
  loss takes the training forward's detached log-probs). rayrl: the same
  (learner/actor.py old_forward_mini_batches: none).
- 4 updates a step (--paper-models, the paper's 4 mini-batches): rayrl grpo.mini_batches 4
  against TRL with steps_per_generation 4: one generation batch of prompts x group split
  over 4 optimizer steps of a quarter each; a TRL "step" here is the 4 optimizer steps of
  one generation. TRL: a pi_old forward over the whole batch (gradient_accumulation_steps
  % steps_per_generation != 0), the reference forward over it, 4 forward+backwards and 4
  optimizer steps, its forward-only passes 8 samples at a time (per_device_train_batch_size).
  rayrl: the same, but pi_old over the last 3 quarters only (the first trains before any
  update, so its training forward's detached log-probs are pi_old), and its forward-only
  passes join mini-batches up to grpo.micro_batch (32): one reference forward over 32, one
  pi_old forward over 24.
Both sides clip the global gradient norm at 1.0 with torch's AdamW: TRL in torch, rayrl's one
learner at ZeRO stage 0 (config.ResourcesConfig.learner_zero_stage) clipping by its own norm.

--side overlap instead times rayrl's loop with grpo.async_steps 0 and 1 (each actor on one
core, so the two phases can overlap) and sets the speed-up against its bound,
(gen + learn + sync) / max(gen, learn + sync), from the synchronous run's own split.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import (  # noqa: E402
    RANDOM_MODELS,
    SMOKE,
    ladder_model,
    machine,
    random_model,
    write_json,
)

SETTINGS = dict(prompts=8, group=4, max_new_tokens=16, lr=1e-5, micro_batch=32, kl=0.001)


def digit_share(response: str) -> float:
    """Dense stand-in reward for a random-init model, which never solves the task: the
    share of digits in its response. Groups are never flat, so both sides update on the
    whole batch (rayrl drops groups whose rewards are all equal)."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


class DenseRewards:
    """RewardPool's `score` interface around digit_share, in the trainer process."""

    def score(self, items):
        return [SimpleNamespace(score=digit_share(resp)) for _, resp, _ in items]

    def shutdown(self) -> None:
        pass


def config(
    model, out: Path, async_steps: int = 0, cpus: float = 2, steps: int = 6, updates: int = 1
):
    from rayrl.config import load_config

    s = SETTINGS
    overrides = {
        "output_dir": str(out),
        "grpo.prompts_per_step": s["prompts"],
        "grpo.rollout_n": s["group"],
        "grpo.max_new_tokens": s["max_new_tokens"],
        "grpo.max_prompt_tokens": 32,
        "grpo.lr": s["lr"],
        "grpo.kl_coef": s["kl"],
        "grpo.micro_batch": s["micro_batch"],
        # Optimizer updates per step, TRL's steps_per_generation (module docstring).
        "grpo.mini_batches": updates,
        # The timed steps, the warm-up and one more: the last timed step still overlaps.
        "grpo.data_budget": s["prompts"] * (steps + 2),
        # One vLLM worker with both cores (bench_rollout's best), learner the same; one
        # core each for the overlap, which runs them side by side.
        "resources.cpus_per_actor": cpus,
        "grpo.async_steps": async_steps,
        # Every model by its directory: the ladder model found may come from tiny.yaml.
        "ladder.models": [{"name": model.name, "path": model.path}],
        "study.models": [model.name],
        "study.family": ["base"],
        "study.sweeps": [],
    }
    return load_config(SMOKE, overrides)


def rayrl_steps(
    model, steps: int, out: Path, async_steps: int = 0, cpus: float = 2, updates: int = 1
) -> dict:
    import ray

    from rayrl.trainer import Run
    from rayrl.trial import Trial

    # 2 (vLLM) + 2 (learner) + 0.5 (reward) logical CPUs: the phases take turns on the
    # 2 cores, so the slots may add up to more than the machine.
    ray.init(address="local", num_cpus=5, include_dashboard=False, log_to_driver=False)
    cfg = config(model, out, async_steps, cpus, steps, updates)
    t0 = time.perf_counter()
    run = Run(cfg, Trial(model.name, "base", SETTINGS["group"], 1, 0), out / f"rayrl-{async_steps}")
    setup = time.perf_counter() - t0
    if not model.trained:
        run.rewards.shutdown()
        run.rewards = DenseRewards()
    rows = []
    try:
        for i in range(steps + 1):  # step 0 warms every actor up
            t0 = time.perf_counter()
            row = run.step(i)
            row["wall"] = time.perf_counter() - t0
            rows.append(row)
    finally:
        run.shutdown()
        ray.shutdown()
    timed = rows[1:]
    # The learner's part by what it does (rayrl/learner/stats.py time_learn_*): pi_old / pi_ref
    # forwards, forward+backward, optimizer; its Ray round trip and the rest are overhead.
    parts = {"gen": "time_gen", "reward": "time_reward", "logprobs": "time_learn_logprobs"}
    parts |= {"fwd_bwd": "time_learn_fwd_bwd", "optimizer": "time_learn_optimizer"}
    parts["sync"] = "time_sync"
    split = {k: sum(r[col] for r in timed) / steps for k, col in parts.items()}
    wall = sum(r["wall"] for r in timed) / steps
    split["overhead"] = wall - sum(split.values())
    return {
        "learn_seconds": round(sum(r["time_learn"] for r in timed) / steps, 3),
        "pad_frac": round(sum(r["pad_frac"] for r in timed) / steps, 3),
        "setup_seconds": round(setup, 2),
        "seconds_per_step": round(wall, 3),
        "split_seconds": {k: round(v, 3) for k, v in split.items()},
        "response_len": round(sum(r["response_len"] for r in timed) / steps, 1),
        "flat_groups_per_step": sum(r["zero_var_groups"] for r in timed) / steps,
        "reward": "digit share (dense stand-in)" if not model.trained else "rayrl verifier",
    }


def trl_steps(model, steps: int, out: Path, updates: int = 1) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rayrl.data import load_task, render_prompt
    from rayrl.rewards import score

    s = SETTINGS
    cfg = config(model, out, steps=steps)
    tok = AutoTokenizer.from_pretrained(model.path)
    rows = load_task(cfg).train[: s["prompts"] * (steps + 1)]
    data = Dataset.from_list(
        [
            {
                "prompt": render_prompt(r, tok),
                "ground_truth": str(r["reward_model"]["ground_truth"]),
                "data_source": r["data_source"],
            }
            for r in rows
        ]
    )

    def reward(completions, ground_truth, data_source, **_):
        if not model.trained:
            return [digit_share(c) for c in completions]
        return [score(d, c, g) for c, g, d in zip(completions, ground_truth, data_source)]

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            self.seconds.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=str(out / "trl"),
        # one generation batch of prompts x group, split over `updates` optimizer steps
        per_device_train_batch_size=s["prompts"] * s["group"] // updates,
        steps_per_generation=updates,
        num_generations=s["group"],
        max_completion_length=s["max_new_tokens"],
        learning_rate=s["lr"],
        beta=s["kl"],  # KL to the reference model, as rayrl's kl_coef
        epsilon=0.2,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        loss_type="dapo",  # token-mean over the batch, as rayrl's loss_agg
        num_iterations=1,
        max_steps=(steps + 1) * updates,
        max_grad_norm=1.0,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        seed=0,
    )
    timer = StepTimer()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=model.path,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[timer],
    )
    setup = time.perf_counter() - t0
    trainer.train()
    # one generation's optimizer steps make one step of rayrl's
    per_generation = [
        sum(timer.seconds[i : i + updates]) for i in range(0, len(timer.seconds), updates)
    ]
    timed = per_generation[1:]
    return {
        "setup_seconds": round(setup, 2),
        "seconds_per_step": round(sum(timed) / len(timed), 3),
        "step_seconds": [round(x, 3) for x in timer.seconds],
        "torch_threads": torch.get_num_threads(),
    }


def overlap(model, steps: int, out: Path) -> dict:
    """Steps per second with async_steps 1 against 0, and the bound the split allows."""
    sync = rayrl_steps(model, steps, out, async_steps=0, cpus=1)
    overlapped = rayrl_steps(model, steps, out, async_steps=1, cpus=1)
    t = sync["split_seconds"]
    gen, learn = t["gen"] + t["reward"], sync["learn_seconds"] + t["sync"]
    speedup = sync["seconds_per_step"] / overlapped["seconds_per_step"]
    bound = (gen + learn) / max(gen, learn)
    return {
        "sync": sync,
        "async": overlapped,
        "speedup": round(speedup, 3),
        "bound": round(bound, 3),
        "share_of_bound": round(speedup / bound, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # "ladder" is the largest ladder model built; tiny-5 and the like name one
    ap.add_argument("--models", default="ladder,rand-25m,rand-150m")
    ap.add_argument(
        "--paper-models", default="rand-25m", help="also timed at 4 updates a step (the paper's)"
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--side", choices=["both", "rayrl", "trl", "overlap"], default="both")
    args = ap.parse_args()
    results = []
    for entry in args.models.split(","):
        key, _, own_steps = entry.partition(":")
        steps = int(own_steps or args.steps)
        model = (
            random_model(key)
            if key in RANDOM_MODELS
            else ladder_model(None if key == "ladder" else key)
        )
        regimes = [1, 4] if key in args.paper_models.split(",") else [1]
        if args.side == "overlap":
            regimes = [1]
        for updates in regimes:
            with tempfile.TemporaryDirectory() as tmp:
                r = {"model": model.name, "matmul_params": model.matmul_params, **SETTINGS}
                r["steps"], r["updates_per_step"] = steps, updates
                if args.side == "overlap":
                    print(f"[grpo] {model.name}: overlap", flush=True)
                    r["overlap"] = overlap(model, steps, Path(tmp))
                if args.side in ("both", "rayrl"):
                    print(f"[grpo] {model.name}: rayrl, {updates} update(s) a step", flush=True)
                    r["rayrl"] = rayrl_steps(model, steps, Path(tmp), updates=updates)
                if args.side in ("both", "trl"):
                    print(f"[grpo] {model.name}: trl, {updates} update(s) a step", flush=True)
                    r["trl"] = trl_steps(model, steps, Path(tmp), updates)
                if "rayrl" in r and "trl" in r:
                    r["ratio_trl_over_rayrl"] = round(
                        r["trl"]["seconds_per_step"] / r["rayrl"]["seconds_per_step"], 3
                    )
                r["machine"] = machine()
                print(f"[grpo] {r}", flush=True)
                results.append(r)
    name = "overlap" if args.side == "overlap" else "grpo"
    print(write_json(name, {"settings": SETTINGS, "models": results}))


if __name__ == "__main__":
    main()
