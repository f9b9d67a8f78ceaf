"""The GRPO loop of one run: rollout -> reward -> advantage -> update -> weight sync.

Every `eval_every` steps the held-out set is scored and one metric row (rayrl/DESIGN.md
schema) is appended to metrics.parquet; every `checkpoint_every` steps the learner
state is saved so `--resume` continues where the last checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rayrl import checkpoint
from rayrl.config import Config, GRPOConfig, dump_config
from rayrl.data import load_task, render_prompt, reuse_schedule
from rayrl.learner.batch import TrainItem
from rayrl.learner.grpo import group_advantages, overlong_penalty, zero_variance
from rayrl.learner.stats import LOGGED, SKIPPED
from rayrl.metrics import (
    HELD_OUT,
    STEP_COLUMNS,
    MetricsLog,
    append_jsonl,
    benchmark_column,
    pass_at_column,
)
from rayrl.models.flops import forward_flops, train_flops
from rayrl.pools import WarmPools, release, start_pools
from rayrl.rewards.custom import Rule, reward_rules, route
from rayrl.rollout.sync import SyncStats
from rayrl.storage import write_bytes_atomic
from rayrl.trial import Trial


@dataclass
class EvalResult:
    pass_at_1: float
    se: float  # standard error over problems of the per-problem pass rate
    problems: int
    answered: float  # share of samples with an answer the verifier could extract
    # k -> (pass@k, its standard error over problems), for each k of grpo.pass_k
    pass_at: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def test_loss(self) -> float:
        return 1.0 - self.pass_at_1  # L = 1 - pass@1


@dataclass
class EvalSet:
    rows: list[dict]
    prompts: list[list[int]]  # token ids of each row's rendered prompt


def reward_items(
    rows: list[dict], groups: list[list[Any]], tokenizer: Any, rules: tuple[Rule, ...] = ()
) -> list[tuple]:
    """(data_source, decoded response, ground truth) for every sample, group by group; a row
    that one of `rules` (rewards.custom) routes also carries the row and its rule."""
    out: list[tuple] = []
    for r, group in zip(rows, groups):
        rule = route(rules, r["data_source"])
        truth = r["reward_model"]["ground_truth"]
        for s in group:
            text = tokenizer.decode(s.token_ids, skip_special_tokens=True)
            out.append(
                (r["data_source"], text, truth, r, rule)
                if rule
                else (r["data_source"], text, str(truth))
            )
    return out


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
    pool: Any,
    rewards: Any,
    sets: dict[str, EvalSet],
    tokenizer: Any,
    g: GRPOConfig,
    seed: int,
    rules: tuple[Rule, ...] = (),
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
    verdicts = rewards.score(reward_items(rows, groups, tokenizer, rules))
    scores = np.array([v.score for v in verdicts]).reshape(len(rows), g.eval_samples)
    correct = (scores >= 1.0).sum(1)  # c: the draws of each problem scored right
    answers = np.array([v.extracted is not None for v in verdicts]).reshape(len(rows), -1).mean(1)
    out, start = {}, 0
    for name, s in sets.items():
        i = slice(start, start + len(s.rows))
        start = i.stop
        mean, se = mean_se(scores[i].mean(1))  # per-problem pass rates
        pass_at = {k: mean_se(pass_at_k(g.eval_samples, correct[i], k)) for k in g.pass_k}
        out[name] = EvalResult(mean, se, i.stop - i.start, float(answers[i].mean()), pass_at)
    return out


def pass_at_k(n: int, correct: np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k of each problem from n draws of which `correct` were right (Chen et
    al. 2021): the chance that k of the n, drawn without replacement, hold a right one."""
    # 1 - C(n - c, k) / C(n, k); C(n - c, k) = 0 when fewer than k draws were wrong
    return np.array([1.0 - math.comb(n - int(c), k) / math.comb(n, k) for c in correct])


def mean_se(per_problem: np.ndarray) -> tuple[float, float]:
    """The mean over problems and its standard error, std / sqrt(problems) (NaN for one)."""
    n = len(per_problem)
    se = float(per_problem.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(per_problem.mean()), se


@dataclass
class Rollout:
    """One step's samples, scored, as the learner takes them. rows, prompts and groups are
    every prompt the step drew, in every generation round; items what the learner trains on."""

    step: int
    rows: list[dict]
    prompts: list[list[int]]
    groups: list[list[Any]]  # per prompt, its rollout_n vLLM Samples
    scores: torch.Tensor  # the verifier's reward of every sample (before any shaping)
    zero_var_groups: int  # groups whose rewards all agree, before dynamic sampling drops them
    gen_rounds: int  # generation rounds (more than 1 only with dynamic sampling)
    trained_groups: int  # the groups the learner gets (all, without dynamic sampling)
    items: list[TrainItem]
    updates: int  # the learner's optimizer updates when vLLM's weights were last synced
    time_gen: float
    time_reward: float


class Run:
    """One GRPO run; owns its actor pools for its lifetime."""

    def __init__(
        self,
        cfg: Config,
        spec: Trial,
        run_dir: Path,
        on_row: Callable[[dict[str, Any]], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        warm: WarmPools | None = None,
    ) -> None:
        """warm: the study's pools in this process (rayrl.pools.WarmPools): take those its
        last run released, where they fit, and release this run's there for the next."""
        from transformers import AutoTokenizer

        self.cfg, self.spec, self.dir, self.on_row = cfg, spec, run_dir, on_row
        self.on_step = on_step  # hears every step's stats, as steps.jsonl records them
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps(spec.to_params()))
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
        self.cursor = 0  # the schedule's next prompt: prompts drawn so far, pending's included
        self.rules = reward_rules(cfg.rewards)  # rewards.custom, routed per row
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
        """Step `step`'s samples from vLLM's current weights, scored, with their advantages.

        Its prompts are the schedule's next ones, from self.cursor. With grpo.dynamic_sampling
        (DAPO) the groups whose rewards all agree are dropped and further rounds draw the next
        prompts of the schedule, as many as are missing, until prompts_per_step groups are
        informative, max_gen_rounds rounds ran or the schedule is spent.
        """
        g, spec, tok, n = self.cfg.grpo, self.spec, self.tokenizer, self.spec.rollout_n
        rows: list[dict] = []
        prompts: list[list[int]] = []
        groups: list[list[Any]] = []
        scores: list[torch.Tensor] = []
        rewards: list[torch.Tensor] = []
        kept: list[int] = []  # the groups to train on, by index into groups
        t_gen = t_reward = 0.0
        rounds = 0
        for rnd in range(g.max_gen_rounds if g.dynamic_sampling else 1):
            want = g.prompts_per_step - len(kept)  # what the step still lacks
            take = slice(self.cursor, min(self.cursor + want, len(self.schedule)))
            if take.stop <= take.start:  # enough informative groups, or the schedule is spent
                break
            self.cursor, rounds = take.stop, rnd + 1
            r_rows, r_prompts = self.schedule[take], self.train_prompts[take]
            t0 = time.perf_counter()
            r_groups = self.rollout.generate(
                r_prompts,
                n=n,
                temperature=g.temperature,
                max_tokens=g.max_new_tokens,
                seed=spec.seed * 1_000_003 + step + rnd * 1_000_000_007,  # round 0: step's seed
            )
            t_gen += time.perf_counter() - t0
            t0 = time.perf_counter()
            to_score = reward_items(r_rows, r_groups, tok, self.rules)
            verdicts = self.rewards.score(to_score)
            score = torch.tensor([v.score for v in verdicts])
            t_reward += time.perf_counter() - t0
            reward = score
            if g.overlong == "penalty":
                lengths = torch.tensor([len(s.token_ids) for grp in r_groups for s in grp])
                reward = score + overlong_penalty(lengths, g.max_new_tokens, g.overlong_buffer)
            flat = zero_variance(reward, n)
            drop = flat & g.dynamic_sampling  # DAPO: a group with no signal is not trained on
            kept += [len(groups) + i for i in range(len(r_groups)) if not drop[i]]
            rows, prompts, groups = rows + r_rows, prompts + r_prompts, groups + r_groups
            scores.append(score)
            rewards.append(reward)

        reward = torch.cat(rewards)
        trained = reward.view(-1, n)[kept].view(-1)
        adv, _ = group_advantages(trained, n, g.adv_eps, g.adv_norm)
        # Flat groups (all rewards equal) have zero advantage. Without dynamic sampling they stay
        # in the token-mean, as in the paper: a batch with one informative group then moves the
        # policy a little, not a full Adam step. With grpo.overlong mask a response cut at
        # max_new_tokens is left out of the loss (its group's advantages still count it).
        items = [
            TrainItem(prompts[i], list(s.token_ids), float(a), list(s.logprobs))
            for i, a_grp in zip(kept, adv.view(-1, n))
            for s, a in zip(groups[i], a_grp)
            if not (g.overlong == "mask" and s.finish_reason == "length")
        ]
        return Rollout(
            step,
            rows,
            prompts,
            groups,
            torch.cat(scores),
            int(zero_variance(reward, n).sum()),
            rounds,
            len(kept),
            items,
            self.updates,
            t_gen,
            t_reward,
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
        learn, sync = SKIPPED, SyncStats(0, 0.0, 0, 0)
        # A batch with no non-zero advantage is skipped: it would be a KL-only update.
        update = any(it.advantage != 0.0 for it in r.items)
        wait = self.learners.start_train(r.items, g.temperature) if update else None
        if g.async_steps and self.cursor < len(self.schedule):
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
        truncated = sum(s.finish_reason == "length" for grp in r.groups for s in grp)
        return {
            "step": step + 1,
            "reward_mean": float(r.scores.mean()),  # the verifier's, over every drawn prompt
            "zero_var_groups": r.zero_var_groups,
            "gen_rounds": r.gen_rounds,
            "prompts_drawn": len(r.prompts),  # counted in data_samples, trained on or not
            "trained_groups": r.trained_groups,
            "truncated_frac": truncated / max(len(r.prompts) * spec.rollout_n, 1),
            "response_len": gen_tokens / max(len(r.prompts) * spec.rollout_n, 1),
            "staleness": staleness,
            # C: 6 N T per optimizer step over the tokens the learner processed (appendix C.1).
            "flops": train_flops(self.n_params, learn["tokens_processed"]),
            # All-in adds rollout generation and the pi_old and reference passes, 2 N T each
            # (forward_tokens counts every pass the learner ran: none of pi_old at one update,
            # none of the reference at kl_coef 0).
            "flops_all": train_flops(self.n_params, learn["tokens_processed"])
            + forward_flops(self.n_params, prompt_tokens + gen_tokens)
            + forward_flops(self.n_params, learn["forward_tokens"]),
            "unique": {row["extra_info"]["index"] for row in r.rows},
            **{f"time_{k}": v for k, v in t.items()},
            **{k: learn[k] for k in LOGGED},  # rayrl/learner/stats.py
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
            self.rules,
        )

    # --- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: bool = True) -> Path:
        g, spec = self.cfg.grpo, self.spec
        ckpt_dir = self.dir / checkpoint.CHECKPOINTS
        # data: prompts drawn by the steps so far (data_samples), the schedule's position
        state = {"step": 0, "compute": 0.0, "compute_all": 0.0, "data": 0, "unique": []}
        if self.metrics.rows and not resume:
            raise FileExistsError(f"{self.dir} already holds a run; pass --resume to continue it")
        # The newest checkpoint whose files match its manifest (none: step 0).
        if resume and (point := checkpoint.resume_point(ckpt_dir)) is not None:
            folder, state = point
            self.learners.load(str(ckpt_dir), folder.name)
            self.rollout.sync_weights()
            # The overlapped loop's next rollout, made from the weights before the checkpoint.
            if (pending := folder / PENDING).exists():
                self.pending = pickle.loads(pending.read_bytes())
            print(f"{spec.run_id}: resumed from step {state['step']}", flush=True)
        state.setdefault("data", state["step"] * g.prompts_per_step)  # a checkpoint from before it
        # The schedule's next prompt: after the steps done and the pending rollout's draws.
        self.cursor = state["data"] + (len(self.pending.prompts) if self.pending else 0)
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
            if self.pending is None and self.cursor >= len(self.schedule):
                break  # dynamic sampling drew the whole schedule in fewer steps
            t0 = time.perf_counter()
            out = self.step(step)
            unique |= out.pop("unique")
            state.update(
                step=step + 1,
                compute=state["compute"] + out["flops"],
                compute_all=state["compute_all"] + out["flops_all"],
                data=state["data"] + out["prompts_drawn"],
            )
            done = step + 1
            last = self.pending is None and self.cursor >= len(self.schedule)  # the run's end
            t1 = time.perf_counter()
            if done % g.eval_every == 0 or last:
                last_eval = self.evaluate(done)
                self._record(done, state, len(unique), last_eval, out)
            out["time_eval"] = time.perf_counter() - t1
            out["wall"] = time.perf_counter() - t0
            append_jsonl(self.dir / "steps.jsonl", {"step": done, **out})
            if self.on_step is not None:
                self.on_step({"step": done, **out})
            if done % g.checkpoint_every == 0 or last:
                state["unique"] = sorted(unique)
                folder, files = checkpoint.save(self.learners, ckpt_dir, done), {}
                if self.pending is not None:  # its updates counted back from this checkpoint
                    gap = self.pending.updates - self.updates
                    pending = dataclasses.replace(self.pending, updates=gap)
                    files[PENDING] = pickle.dumps(pending)
                checkpoint.seal(folder, state, g.checkpoint_keep, self.model_dir, files)
            bar.update(1)
            bar.set_postfix_str(
                f"reward {out['reward_mean']:.2f} loss {last_eval[HELD_OUT].test_loss if last_eval else float('nan'):.3f} "
                f"gen {out['time_gen']:.1f}s learn {out['time_learn']:.1f}s sync {out['time_sync']:.2f}s"
            )
        bar.close()
        # The final policy as an HF directory (transformers, vLLM), from the last checkpoint.
        trained = start < state["step"]
        checkpoint.export_final(self.dir, state["step"], self.model_dir, trained, g.export_final)
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
            "data_samples": state["data"],
            "unique_samples": unique,
            "rollout_n": spec.rollout_n,
            "reuse_factor": spec.reuse_factor,
            "seed": spec.seed,
            "variant": spec.variant,
            **{benchmark_column(name): e.test_loss for name, e in ev.items()},
            **{benchmark_column(name) + "_se": e.se for name, e in ev.items()},
            "compute_flops_all": state["compute_all"],
            "answer_rate": ev[HELD_OUT].answered,
            **{
                pass_at_column(k, name): p
                for name, e in ev.items()
                for k, (p, _) in e.pass_at.items()
            },
            **{
                pass_at_column(k, name) + "_se": se
                for name, e in ev.items()
                for k, (_, se) in e.pass_at.items()
            },
            **{k: out[k] for k in STEP_COLUMNS if k in out},
        }
        self.metrics.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def shutdown(self, keep: bool = True) -> None:
        """Stop the pools, or with a warm run and keep, release them for the next run."""
        release(self.pools, warm=self.warm if keep else None)


PENDING = "pending.pkl"  # in a checkpoint's folder: the overlapped loop's next rollout


def truncate_jsonl(path: Path, step: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        write_bytes_atomic(path, "".join(ln + "\n" for ln in keep).encode())


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
    spec: Trial,
    run_dir: Path | None = None,
    resume: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    warm: WarmPools | None = None,
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
