"""The GRPO loop of one run: rollout -> reward -> advantage -> update -> weight sync.

Every `eval_every` steps the held-out set is scored and one metric row (DESIGN.md
schema) is appended to metrics.parquet; every `checkpoint_every` steps the learner
state is saved so `--resume` continues where the last checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rayrl.config import Config, GRPOConfig, dump_config
from rayrl.data import load_task, render_prompt, reuse_schedule
from rayrl.learner.batch import TrainItem
from rayrl.learner.grpo import group_advantages
from rayrl.metrics import HELD_OUT, MetricsLog, append_jsonl, benchmark_column
from rayrl.models.flops import forward_flops, train_flops
from rayrl.pools import release, start_pools
from rayrl.rollout.sync import SyncStats


@dataclass
class RunSpec:
    """What distinguishes one run of a study from another."""

    model: str
    rollout_n: int
    reuse_factor: int
    seed: int
    family: str = "base"

    @property
    def run_id(self) -> str:
        return f"{self.model}-{self.family}-n{self.rollout_n}-tau{self.reuse_factor}-s{self.seed}"

    @classmethod
    def of(cls, trial: dict[str, Any]) -> RunSpec:
        """The run of one of `Config.trials()`."""
        return cls(
            trial["model"],
            trial["rollout_n"],
            trial["reuse_factor"],
            trial["seed"],
            trial["family"],
        )


@dataclass
class EvalResult:
    pass_at_1: float
    se: float  # standard error over problems of the per-problem pass rate
    problems: int
    answered: float  # share of samples with an answer the verifier could extract

    @property
    def test_loss(self) -> float:
        return 1.0 - self.pass_at_1  # L = 1 - pass@1


@dataclass
class EvalSet:
    rows: list[dict]
    prompts: list[list[int]]  # token ids of each row's rendered prompt


def reward_items(
    rows: list[dict], groups: list[list[Any]], tokenizer: Any
) -> list[tuple[str, str, str]]:
    """(data_source, decoded response, ground truth) for every sample, group by group."""
    return [
        (
            r["data_source"],
            tokenizer.decode(s.token_ids, skip_special_tokens=True),
            str(r["reward_model"]["ground_truth"]),
        )
        for r, group in zip(rows, groups)
        for s in group
    ]


def encode_prompts(rows: list[dict], tokenizer: Any, max_tokens: int) -> list[list[int]]:
    """Token ids of each row's rendered prompt; one longer than max_tokens is an error (veRL's
    default), never a silent truncation of the question."""
    prompts = tokenizer([render_prompt(r, tokenizer) for r in rows]).input_ids
    for r, p in zip(rows, prompts):
        if len(p) > max_tokens:
            raise ValueError(
                f"prompt of {r['data_source']} row {r['extra_info'].get('index')} has {len(p)} "
                f"tokens, over grpo.max_prompt_tokens={max_tokens}"
            )
    return prompts


def evaluate(
    pool: Any, rewards: Any, sets: dict[str, EvalSet], tokenizer: Any, g: GRPOConfig, seed: int
) -> dict[str, EvalResult]:
    """pass@1 of every set from `g.eval_samples` draws per problem at `g.eval_temperature`,
    in one generate call and one scoring call; each row is scored by its own verifier."""
    rows = [r for s in sets.values() for r in s.rows]
    prompts = [p for s in sets.values() for p in s.prompts]
    groups = pool.generate(
        prompts,
        n=g.eval_samples,
        temperature=g.eval_temperature,
        max_tokens=g.max_new_tokens,
        seed=seed,
    )
    verdicts = rewards.score(reward_items(rows, groups, tokenizer))
    per_problem = np.array([v.score for v in verdicts]).reshape(len(rows), g.eval_samples).mean(1)
    answers = np.array([v.extracted is not None for v in verdicts]).reshape(len(rows), -1).mean(1)
    out, start = {}, 0
    for name, s in sets.items():
        i = slice(start, start + len(s.rows))
        p, start = per_problem[i], i.stop
        se = float(p.std(ddof=1) / np.sqrt(len(p))) if len(p) > 1 else float("nan")
        out[name] = EvalResult(float(p.mean()), se, len(p), float(answers[i].mean()))
    return out


@dataclass
class Rollout:
    """One step's samples, scored, as the learner takes them."""

    step: int
    rows: list[dict]
    prompts: list[list[int]]
    groups: list[list[Any]]  # per prompt, its rollout_n vLLM Samples
    rewards: torch.Tensor
    flat_groups: int
    items: list[TrainItem]
    updates: int  # the learner's optimizer updates when vLLM's weights were last synced
    time_gen: float
    time_reward: float


class Run:
    """One GRPO run; owns its actor pools for its lifetime."""

    def __init__(
        self,
        cfg: Config,
        spec: RunSpec,
        run_dir: Path,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        warm: bool = False,
    ) -> None:
        """warm: take the pools the last run in this process released, where they fit
        (rayrl.pools), and release this run's for the next one."""
        from transformers import AutoTokenizer

        self.cfg, self.spec, self.dir, self.on_row = cfg, spec, run_dir, on_row
        self.on_step = on_step  # hears every step's stats, as steps.jsonl records them
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps(dataclasses.asdict(spec)))
        g = cfg.grpo
        self.model_dir = resolve_model_dir(cfg, spec.model, spec.family)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.n_params = ladder_params(self.model_dir)
        task = load_task(cfg)
        # Encoded once, before any actor starts: a prompt over max_prompt_tokens fails here.
        self.eval_sets = {
            name: EvalSet(rows, encode_prompts(rows, self.tokenizer, g.max_prompt_tokens))
            for name, rows in {HELD_OUT: task.test, **task.evals}.items()
        }
        self.schedule = reuse_schedule(
            task.train, g.data_budget, spec.reuse_factor, spec.seed, self.cfg.data.order
        )
        # The schedule repeats its subset tau times: each distinct row is encoded once.
        unique = list({id(r): r for r in self.schedule}.values())
        encoded = encode_prompts(unique, self.tokenizer, g.max_prompt_tokens)
        by_row = {id(r): p for r, p in zip(unique, encoded)}
        self.train_prompts = [by_row[id(r)] for r in self.schedule]
        self.steps = g.steps
        self.updates = 0  # optimizer updates so far (vLLM holds them all after each sync)
        self.pending: Rollout | None = None  # the next step's rollout, made while this learns
        self.metrics = MetricsLog(run_dir / "metrics.parquet")
        self.warm = warm
        self.pools = start_pools(
            cfg,
            spec.model,
            spec.family,
            self.model_dir,
            spec.rollout_n,
            spec.seed,
            name=f"rollout:{spec.run_id}",
            warm=warm,
        )
        self.rollout, self.learners, self.rewards = (
            self.pools.rollout,
            self.pools.learners,
            self.pools.rewards,
        )

    # --- one step ------------------------------------------------------------------------
    def rollout_step(self, step: int) -> Rollout:
        """Step `step`'s samples from vLLM's current weights, scored, with their advantages."""
        g, spec, tok = self.cfg.grpo, self.spec, self.tokenizer
        batch_slice = slice(step * g.prompts_per_step, (step + 1) * g.prompts_per_step)
        rows, prompts = self.schedule[batch_slice], self.train_prompts[batch_slice]

        t0 = time.perf_counter()
        groups = self.rollout.generate(
            prompts,
            n=spec.rollout_n,
            temperature=g.temperature,
            max_tokens=g.max_new_tokens,
            seed=spec.seed * 1_000_003 + step,
        )
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        verdicts = self.rewards.score(reward_items(rows, groups, tok))
        rewards = torch.tensor([v.score for v in verdicts])
        t_reward = time.perf_counter() - t0

        adv, flat_groups = group_advantages(rewards, spec.rollout_n, g.adv_eps)
        # Flat groups (all rewards equal) have zero advantage but stay in the token-mean, as in
        # the paper: a batch with one informative group then moves the policy a little, not a
        # full Adam step. A batch of flat groups only is skipped: it would be a KL-only update.
        items = [
            TrainItem(p, list(s.token_ids), float(a), list(s.logprobs))
            for p, grp, a_grp in zip(prompts, groups, adv.view(-1, spec.rollout_n))
            for s, a in zip(grp, a_grp)
        ]
        return Rollout(
            step, rows, prompts, groups, rewards, flat_groups, items, self.updates, t_gen, t_reward
        )

    def step(self, step: int) -> dict[str, Any]:
        """One GRPO step. With grpo.async_steps 1 the next step's rollout is generated and
        scored while this one learns (vLLM still holds the weights this step started from),
        so the next step learns from samples one update stale."""
        g, spec = self.cfg.grpo, self.spec
        r = self.pending if self.pending and self.pending.step == step else self.rollout_step(step)
        self.pending = None
        staleness = self.updates - r.updates  # optimizer updates since its weights were synced
        t: dict[str, float] = {"gen": r.time_gen, "reward": r.time_reward}
        t0, t["learn"] = time.perf_counter(), 0.0
        learn, sync = SKIPPED_UPDATE, SyncStats(0, 0.0, 0, 0)
        update = r.flat_groups < len(r.prompts)
        wait = self.learners.start_train(r.items, g.temperature) if update else None
        if g.async_steps and step + 1 < self.steps:
            self.pending = self.rollout_step(step + 1)
        if wait is not None:
            learn = wait()
            t["learn"] = time.perf_counter() - t0  # overlapped: includes the next rollout
            self.updates += 1
            t0 = time.perf_counter()
            sync = self.rollout.sync_weights()
        t["sync"] = time.perf_counter() - t0

        prompt_tokens = sum(len(p) for p in r.prompts) * spec.rollout_n
        gen_tokens = sum(len(s.token_ids) for grp in r.groups for s in grp)
        return {
            "step": step + 1,
            "reward_mean": float(r.rewards.mean()),
            "flat_groups": r.flat_groups,
            "response_len": gen_tokens / max(len(r.prompts) * spec.rollout_n, 1),
            "staleness": staleness,
            # C: 6 N T per optimizer step over the tokens the learner processed (appendix C.1).
            "flops": train_flops(self.n_params, learn["tokens_processed"]),
            # All-in adds rollout generation and the pi_old and reference passes, 2 N T each.
            "flops_all": train_flops(self.n_params, learn["tokens_processed"])
            + forward_flops(self.n_params, prompt_tokens + gen_tokens)
            + 2 * forward_flops(self.n_params, learn["forward_tokens"]),
            "unique": {row["extra_info"]["index"] for row in r.rows},
            **{f"time_{k}": v for k, v in t.items()},
            **{k: learn[k] for k in LEARNER_STATS},
            **sync.metrics(),
        }

    def evaluate(self, step: int) -> dict[str, EvalResult]:
        return evaluate(
            self.rollout,
            self.rewards,
            self.eval_sets,
            self.tokenizer,
            self.cfg.grpo,
            10_000_019 + step,
        )

    # --- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = True) -> Path:
        g, spec = self.cfg.grpo, self.spec
        ckpt_dir = self.dir / "checkpoints"
        state = {"step": 0, "compute": 0.0, "compute_all": 0.0, "unique": []}
        if self.metrics.rows and not resume:
            raise FileExistsError(f"{self.dir} already holds a run; pass --resume to continue it")
        if resume and (latest := checkpoint_state(self.dir)) is not None:
            state = latest
            self.learners.load(str(ckpt_dir), f"step{state['step']}")
            self.rollout.sync_weights()
            # The overlapped loop's next rollout, made from the weights before the checkpoint.
            if (pending := ckpt_dir / f"step{state['step']}" / PENDING).exists():
                self.pending = pickle.loads(pending.read_bytes())
            print(f"{spec.run_id}: resumed from step {state['step']}", flush=True)
        # Steps after the checkpoint are recomputed, so their records go.
        self.metrics.truncate_after(state["step"])
        truncate_jsonl(self.dir / "steps.jsonl", state["step"])
        unique: set = set(state["unique"])
        start = state["step"]

        if not any(r["step"] == start for r in self.metrics.rows):
            self._record(start, state, len(unique), self.evaluate(start), {})
        bar = tqdm(
            total=self.steps,
            initial=start,
            desc=spec.run_id,
            disable=not progress,
            dynamic_ncols=True,
        )
        last_eval = None
        for step in range(start, self.steps):
            t0 = time.perf_counter()
            out = self.step(step)
            unique |= out.pop("unique")
            state.update(
                step=step + 1,
                compute=state["compute"] + out["flops"],
                compute_all=state["compute_all"] + out["flops_all"],
            )
            done = step + 1
            t1 = time.perf_counter()
            if done % g.eval_every == 0 or done == self.steps:
                last_eval = self.evaluate(done)
                self._record(done, state, len(unique), last_eval, out)
            out["time_eval"] = time.perf_counter() - t1
            out["wall"] = time.perf_counter() - t0
            append_jsonl(self.dir / "steps.jsonl", {"step": done, **out})
            if self.on_step is not None:
                self.on_step({"step": done, **out})
            if done % g.checkpoint_every == 0 or done == self.steps:
                state["unique"] = sorted(unique)
                self.learners.save(str(ckpt_dir), f"step{done}")
                if self.pending is not None:  # its updates counted back from this checkpoint
                    gap = self.pending.updates - self.updates
                    pending = dataclasses.replace(self.pending, updates=gap)
                    (ckpt_dir / f"step{done}" / PENDING).write_bytes(pickle.dumps(pending))
                (ckpt_dir / LATEST).write_text(json.dumps(state))
            bar.update(1)
            bar.set_postfix_str(
                f"reward {out['reward_mean']:.2f} loss {last_eval[HELD_OUT].test_loss if last_eval else float('nan'):.3f} "
                f"gen {out['time_gen']:.1f}s learn {out['time_learn']:.1f}s sync {out['time_sync']:.2f}s"
            )
        bar.close()
        return self.dir

    def _record(
        self, step: int, state: dict, unique: int, ev: dict[str, EvalResult], out: dict
    ) -> None:
        spec = self.spec
        row = {
            "run_id": spec.run_id,
            "family": spec.family,
            "model": spec.model,
            "n_params": self.n_params,
            "step": step,
            "compute_flops": state["compute"],
            "data_samples": step * self.cfg.grpo.prompts_per_step,
            "unique_samples": unique,
            "rollout_n": spec.rollout_n,
            "reuse_factor": spec.reuse_factor,
            "seed": spec.seed,
            **{benchmark_column(name): e.test_loss for name, e in ev.items()},
            **{benchmark_column(name) + "_se": e.se for name, e in ev.items()},
            "compute_flops_all": state["compute_all"],
            "answer_rate": ev[HELD_OUT].answered,
            **{k: out[k] for k in ("reward_mean", "response_len", "flat_groups") if k in out},
        }
        self.metrics.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def shutdown(self, keep: bool = True) -> None:
        """Stop the pools, or with a warm run and keep, release them for the next run."""
        release(self.pools, warm=self.warm and keep)


# What the learner reports each step, into steps.jsonl.
LEARNER_STATS = (
    "loss",
    "pg_loss",
    "kl",
    "clip_frac",
    "clip_frac_dual",
    "ratio_mean",
    "ratio_max",
    "logp_diff_mean",  # |log pi_vLLM - log pi_old| over response tokens
    "logp_diff_max",
    "is_weight_mean",  # TIS weights min(pi_old / pi_vLLM, is_cap), when off-policy
    "is_weight_max",
    "is_capped_frac",
    "grad_norm",
)
# A step whose every group was flat: no optimizer update, no learner tokens, no sync.
SKIPPED_UPDATE = dict.fromkeys((*LEARNER_STATS, "tokens_processed", "forward_tokens"), 0.0)


LATEST = "latest.json"  # in run_dir/checkpoints: the last checkpoint's loop state
PENDING = "pending.pkl"  # in a checkpoint's folder: the overlapped loop's next rollout


def checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The loop state (step, compute, unique prompts) of a run's last checkpoint, if any."""
    path = run_dir / "checkpoints" / LATEST
    return json.loads(path.read_text()) if path.exists() else None


def truncate_jsonl(path: Path, step: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def resolve_model_dir(cfg: Config, name: str, family: str) -> str:
    """An external model's own directory (checked before any actor starts), or the
    ladder's (built on first use)."""
    from rayrl.models.external import check_models
    from rayrl.models.ladder import model_path

    check_models(cfg, [(name, family)])
    return str(model_path(cfg, name, family))


def ladder_params(model_dir: str) -> int:
    """Non-embedding parameter count N of a saved model, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayrl.models.flops import count_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return count_params(model)[1]


def train(
    cfg: Config,
    spec: RunSpec,
    run_dir: Path | None = None,
    resume: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    warm: bool = False,
) -> Path:
    """Run one GRPO training run to the end of its data budget; returns the run directory.
    warm: pools from and for the other runs of this process (Run)."""
    run_dir = run_dir or Path(cfg.output_dir) / spec.run_id
    run = Run(cfg, spec, run_dir, on_row, on_step, warm=warm)
    try:
        out = run.run(resume=resume, progress=progress)
    except SystemExit:  # Tune stopping the trial, at a report between steps: pools are sound
        run.shutdown()
        raise
    except BaseException:  # a pool may be broken mid-call: never hand it on
        run.shutdown(keep=False)
        raise
    run.shutdown()
    return out
