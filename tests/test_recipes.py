"""The recipes the field compares, against hand-computed values: the GSPO and CISPO policy
losses, Dr. GRPO's and ScaleRL's advantages, Dr. GRPO's constant normaliser, DAPO's dynamic
sampling and overlong handling, and unbiased pass@k. Each knob is shown to act."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rayrl import cli
from rayrl.config import GRPOConfig, load_config
from rayrl.learner.grpo import (
    group_advantages,
    grpo_loss,
    loss_denominator,
    overlong_penalty,
    zero_variance,
)
from rayrl.learner.stats import SKIPPED
from rayrl.metrics import HELD_OUT, MetricsLog, check_row, column_type, pass_at_column
from rayrl.rewards.custom import reward_rules
from rayrl.rewards.verdict import Verdict
from rayrl.rollout.sync import SyncStats
from rayrl.rollout.worker import Sample
from rayrl.trainer import EvalResult, EvalSet, Run, evaluate, pass_at_k
from rayrl.trial import Trial

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# --- the policy losses on one small batch -------------------------------------------------
# Sequence 0 has 2 response tokens and one pad (whose log-prob is -inf); sequence 1 fills the
# whole width, max_new_tokens = 3: a truncated response. pi_old is 1 everywhere (log 0), so
# each log-prob is its token's log-ratio: ratios 1.1, 1.5 | 0.9, 1.0, 0.7.
RATIOS = [[1.1, 1.5, 1.0], [0.9, 1.0, 0.7]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([1.0, -0.5])


def run_loss(loss_agg="token-mean", **kw):
    """The loss, its gradient with respect to each log-prob, and its statistics."""
    g = GRPOConfig(kl_coef=0.0, max_new_tokens=3, loss_agg=loss_agg, **kw)
    logp = torch.log(torch.tensor(RATIOS))
    logp[0, 2] = float("-inf")  # padding
    logp.requires_grad_(True)
    old = torch.zeros(2, 3)
    denom = loss_denominator([2, 3], g)
    loss, stats = grpo_loss(logp, old, old, ADV, MASK, g, denom)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0.0  # padding: no gradient
    return loss.item(), logp.grad.view(-1).tolist(), stats  # row by row


def test_ppo_clip_by_hand():
    loss, grad, stats = run_loss()
    # A = 1: -rho A = -1.1 inside the clip, 1.5 clipped to 1.2 (no gradient).
    # A = -0.5: 0.45 and 0.5 inside; 0.7 clipped up to 0.8: max(0.35, 0.4) = 0.4, no gradient.
    assert loss == pytest.approx((-1.1 - 1.2 + 0.45 + 0.5 + 0.4) / 5)
    # d(-A rho)/d log pi = -A rho, over the 5 tokens
    assert grad == pytest.approx([-1.1 / 5, 0, 0, 0.45 / 5, 0.5 / 5, 0])
    assert stats["clip_frac"] == 2 and stats["tokens"] == 5


def test_gspo_clips_whole_sequences_by_hand():
    s0, s1 = math.sqrt(1.1 * 1.5), (0.9 * 1.0 * 0.7) ** (1 / 3)  # geometric means: 1.2845, 0.8573
    kw = {"policy_loss": "gspo", "gspo_clip_low": 0.2, "gspo_clip_high": 0.2}
    loss, grad, stats = run_loss("seq-mean-token-mean", **kw)
    # sequence 0 (A = 1): s0 above 1.2, clipped: -1.2 and no gradient on either token.
    # sequence 1 (A = -0.5): s1 inside [0.8, 1.2]: 0.5 s1 on each token, whose mean is 0.5 s1.
    assert loss == pytest.approx((-1.2 + 0.5 * s1) / 2)
    # d(0.5 s_1)/d log pi_t = 0.5 s_1 / |o_1|, then the mean over the 2 sequences
    assert grad == pytest.approx([0, 0, 0] + [0.5 * s1 / 3 / 2] * 3)
    assert stats["clip_frac"] == 2  # both of sequence 0's tokens
    assert stats["ratio_max"] == pytest.approx(s0)
    # The gradient is the paper's sequence objective's, -(1/G) sum_i min(s_i A_i, clip(s_i) A_i)
    logp = torch.log(torch.tensor(RATIOS)).requires_grad_(True)
    s = torch.stack([logp[0, :2].mean().exp(), logp[1].mean().exp()])
    paper = -torch.minimum(s * ADV, s.clamp(0.8, 1.2) * ADV).mean()
    paper.backward()
    assert paper.item() == pytest.approx(loss)
    torch.testing.assert_close(torch.tensor(grad).view(2, 3), logp.grad * MASK)
    # Its own clip range: GSPO's default 3e-4 / 4e-4 clips sequence 1 as well (no gradient),
    # and the token-level clip fields are not what it reads.
    _, grad, stats = run_loss("seq-mean-token-mean", policy_loss="gspo", clip_high=10.0)
    assert stats["clip_frac"] == 5 and grad == [0.0] * 6


def test_cispo_keeps_a_gradient_on_clipped_tokens_by_hand():
    loss, grad, stats = run_loss(policy_loss="cispo", cispo_clip_high=0.2)
    w = [[1.1, 1.2], [0.9, 1.0, 0.7]]  # sg(min(rho, 1.2)): 1.5 truncated to 1.2
    logp = [[math.log(r) for r in row] for row in RATIOS]
    # -w A log pi per token, over the 5 tokens
    per_token = [-w[0][t] * 1.0 * logp[0][t] for t in range(2)]
    per_token += [-w[1][t] * -0.5 * logp[1][t] for t in range(3)]
    assert loss == pytest.approx(sum(per_token) / 5)
    # d/d log pi = -w A: the truncated token still has one (PPO-clip gave it none)
    assert grad == pytest.approx([-1.1 / 5, -1.2 / 5, 0, 0.45 / 5, 0.5 / 5, 0.35 / 5])
    assert stats["clip_frac"] == 1
    # a higher cap lets the weight through: 1.5 instead of 1.2
    _, grad, _ = run_loss(policy_loss="cispo", cispo_clip_high=3.0)
    assert grad[1] == pytest.approx(-1.5 / 5)


def test_seq_mean_token_sum_norm_divides_by_a_constant_by_hand():
    loss, grad, _ = run_loss("seq-mean-token-sum-norm")
    # the token sums of the PPO-clip test over G * max_new_tokens = 2 * 3, whatever the lengths
    assert loss == pytest.approx((-1.1 - 1.2 + 0.45 + 0.5 + 0.4) / 6)
    assert grad == pytest.approx([-1.1 / 6, 0, 0, 0.45 / 6, 0.5 / 6, 0])
    g = GRPOConfig(loss_agg="seq-mean-token-sum-norm", max_new_tokens=16)
    assert loss_denominator([2, 3], g) == 32.0
    assert loss_denominator([2, 3], GRPOConfig(loss_agg="seq-mean-token-sum")) == 2.0
    # split in two micro-batches over the batch's denominator, the parts add up to the whole
    g = GRPOConfig(kl_coef=0.0, max_new_tokens=3, loss_agg="seq-mean-token-sum-norm")
    logp = torch.log(torch.tensor(RATIOS))
    parts = [
        grpo_loss(logp[i : i + 1], torch.zeros(1, 3), logp[i : i + 1], ADV[i : i + 1],
                  MASK[i : i + 1], g, 6.0)[0].item()
        for i in range(2)
    ]  # fmt: skip
    assert sum(parts) == pytest.approx(loss)


# --- advantages -----------------------------------------------------------------------------
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # two groups of 4


@pytest.mark.parametrize(
    "norm, expected",
    [
        # group stds (unbiased) 0.5 and 0.57735
        ("group_std", [1.5, -0.5, -0.5, -0.5] + [0.5 / 0.5773503] * 2 + [-0.5 / 0.5773503] * 2),
        ("none", [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]),  # r - group mean
        # the centred rewards' std over the batch: sqrt((0.75 + 1.0) / 7) = 0.5
        ("batch_std", [1.5, -0.5, -0.5, -0.5, 1.0, 1.0, -1.0, -1.0]),
    ],
)
def test_advantage_normalisations_by_hand(norm, expected):
    adv, flat = group_advantages(REWARDS, n=4, eps=0.0, norm=norm)
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert flat == 0
    # and the gradient follows: a ratio-1 token's is -A / tokens (token-mean, no KL)
    logp = torch.zeros(8, 1, requires_grad=True)
    grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(8, 1), GRPOConfig(kl_coef=0), 8)[
        0
    ].backward()
    assert logp.grad.view(-1).tolist() == pytest.approx([-a / 8 for a in expected], abs=1e-6)


def test_zero_variance_groups():
    assert zero_variance(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2).tolist() == [
        True,
        False,
        True,
    ]
    # every normalisation gives a flat group zero advantage
    for norm in ("group_std", "none", "batch_std"):
        adv, flat = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), n=2, norm=norm)
        assert flat == 1 and adv[:2].tolist() == [0.0, 0.0] and adv[2] < 0 < adv[3]


def test_overlong_penalty_by_hand():
    # L_max 16, L_cache 4: free up to 12 tokens, then -1/4 a token, -1 at 16
    lengths = torch.tensor([3, 12, 13, 14, 16])
    assert overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(torch.tensor([16]), 16, 16).item() == -1.0
    assert overlong_penalty(torch.tensor([20]), 16, 4).item() == -1.0  # the paper's -1 past L_max


# --- pass@k ---------------------------------------------------------------------------------
def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of the C(n, k) k-subsets of n draws (c of them right) holding a right one."""
    draws = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(draws, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_against_the_closed_form():
    for n in (1, 2, 4, 7):
        for k in range(1, n + 1):
            got = pass_at_k(n, np.arange(n + 1), k)
            want = [pass_at_k_by_enumeration(n, c, k) for c in range(n + 1)]
            assert got.tolist() == pytest.approx(want), (n, k)
    assert pass_at_k(4, np.array([1]), 2)[0] == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, np.array([1, 2, 0]), 1).tolist() == pytest.approx([0.25, 0.5, 0.0])


def test_pass_at_k_is_unbiased_by_monte_carlo():
    """Problems solved with probability p, n = 8 draws each: the estimator's mean is the true
    pass@k, 1 - (1 - p)^k; the biased plug-in 1 - (1 - c/n)^k falls short of it."""
    rng = np.random.default_rng(0)
    n, k, problems = 8, 4, 40_000
    p = rng.uniform(0.0, 0.6, problems)
    c = rng.binomial(n, p)
    est = pass_at_k(n, c, k)
    truth = 1 - (1 - p) ** k
    se = est.std() / math.sqrt(problems)
    assert abs(est.mean() - truth.mean()) < 4 * se
    plug_in = 1 - (1 - c / n) ** k
    assert truth.mean() - plug_in.mean() > 10 * se
    # and the k-subsets it averages over, sampled: 20,000 draws of 4 of 8 with 2 right
    draws = np.array([True, True] + [False] * 6)
    hits = [draws[rng.choice(8, 4, replace=False)].any() for _ in range(20_000)]
    assert np.mean(hits) == pytest.approx(pass_at_k(8, np.array([2]), 4)[0], abs=0.015)


def test_evaluation_writes_pass_at_k_per_set():
    """Fakes for vLLM and the RewardPool; each prompt's draws are right by a fixed pattern."""
    right = {1: [1, 1, 1, 1], 2: [1, 0, 0, 0], 3: [0, 0, 0, 0], 4: [0, 1, 0, 0]}

    class Pool:
        def generate(self, prompts, n, **_):
            return [[Sample([p[0], j], [0.0, 0.0], "stop", "") for j in range(n)] for p in prompts]

    class Rewards:
        def score(self, items):
            return [Verdict.of(r == "1", r) for _, r, _ in items]

    class Tokenizer:
        def decode(self, ids, **_):
            return str(right[ids[0]][ids[1]])

    rows = [{"data_source": "synthetic", "reward_model": {"ground_truth": "1"}}] * 4
    sets = {HELD_OUT: EvalSet(rows[:2], [[1], [2]]), "other": EvalSet(rows[2:], [[3], [4]])}
    g = GRPOConfig(eval_samples=4, pass_k=[1, 2, 4])
    out = evaluate(Pool(), Rewards(), sets, Tokenizer(), g, seed=0)
    held, other = out[HELD_OUT], out["other"]
    assert held.pass_at_1 == pytest.approx(5 / 8) and held.pass_at[1][0] == pytest.approx(5 / 8)
    # problem 2 (1 right of 4): pass@2 = 1 - C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert held.pass_at[2][0] == pytest.approx((1 + 0.5) / 2)
    assert held.pass_at[4] == pytest.approx((1.0, 0.0))
    assert other.pass_at[4][0] == pytest.approx(0.5)
    assert other.pass_at[4][1] == pytest.approx(0.5)  # std 0.707 over 2 problems / sqrt(2)
    # the knob: only the ks asked for
    out = evaluate(Pool(), Rewards(), sets, Tokenizer(), GRPOConfig(eval_samples=4), seed=0)
    assert sorted(out[HELD_OUT].pass_at) == [1]


def test_metric_rows_carry_pass_at_k_columns(tmp_path):
    assert pass_at_column(4, HELD_OUT) == "pass_at_4"
    assert pass_at_column(4, "sub") == "pass_at_4_sub"
    assert column_type("pass_at_4_sub_se") is float and column_type("pass_at_x") is None
    run = object.__new__(Run)
    run.cfg, run.spec, run.n_params, run.on_row = (
        load_config(TINY),
        Trial("tiny-3", "base", 8, 1, 0),
        1000,
        None,
    )
    run.metrics = MetricsLog(tmp_path / "metrics.parquet")
    ev = {
        HELD_OUT: EvalResult(0.25, 0.01, 10, 0.5, {1: (0.25, 0.01), 4: (0.5, 0.02)}),
        "sub": EvalResult(0.5, 0.02, 5, 1.0, {1: (0.5, 0.02), 4: (0.75, 0.03)}),
    }
    state = {"compute": 1.0, "compute_all": 2.0, "data": 48}
    out = {"reward_mean": 0.3, "zero_var_groups": 5, "gen_rounds": 2, "truncated_frac": 0.1}
    run._record(3, state, 40, ev, out)
    (row,) = run.metrics.rows
    check_row(row, "row")
    assert row["test_loss"] == 0.75  # still 1 - pass@1
    assert (row["pass_at_4"], row["pass_at_4_se"], row["pass_at_4_sub"]) == (0.5, 0.02, 0.75)
    assert row["data_samples"] == 48  # the prompts drawn, not step x prompts_per_step
    assert (row["zero_var_groups"], row["gen_rounds"], row["truncated_frac"]) == (5, 2, 0.1)


# --- dynamic sampling and overlong, in the step ----------------------------------------------
# Prompt i's 4 samples: i % 3 == 0 all right, 1 all wrong, 2 right on even j. Sample j has
# j + 1 tokens, so the last (4 = max_new_tokens) is cut at the length limit.
N = 4


class FakePool:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, seed, max_tokens, **_):
        self.calls.append(([p[0] for p in prompts], seed))
        return [
            [
                Sample([p[0]] * (j + 1), [0.0] * (j + 1), "length" if j + 1 == max_tokens else "stop", "")
                for j in range(n)
            ]
            for p in prompts
        ]  # fmt: skip

    def sync_weights(self):
        return SyncStats(0, 0.0, 0, 0)


class FakeRewards:
    def score(self, items):
        out = []
        for _, text, _ in items:
            i, j = map(int, text.split(":"))
            out.append(Verdict.of(i % 3 == 0 or (i % 3 == 2 and j % 2 == 0), text))
        return out


class FakeTokenizer:
    def decode(self, ids, **_):
        return f"{ids[0]}:{len(ids) - 1}"


class FakeLearners:
    def __init__(self):
        self.batches = []

    def start_train(self, items, temperature):
        self.batches.append(items)
        tokens = sum(len(it.prompt_ids) + len(it.response_ids) for it in items)
        return lambda: {**SKIPPED, "tokens_processed": tokens, "forward_tokens": tokens}


def fake_run(prompts=4, **grpo) -> Run:
    cfg = load_config(
        TINY,
        {
            "grpo.prompts_per_step": prompts,
            "grpo.mini_batches": 1,
            "grpo.max_new_tokens": 4,
            **{f"grpo.{k}": v for k, v in grpo.items()},
        },
    )
    run = object.__new__(Run)
    run.cfg, run.spec, run.tokenizer = cfg, Trial("tiny-3", "base", N, 1, 7), FakeTokenizer()
    run.schedule = [
        {"data_source": "synthetic", "reward_model": {"ground_truth": "1"}, "extra_info": {"index": i}}
        for i in range(24)
    ]  # fmt: skip
    run.train_prompts = [[i] for i in range(24)]
    run.rollout, run.rewards, run.learners = FakePool(), FakeRewards(), FakeLearners()
    run.updates, run.cursor, run.pending, run.n_params = 0, 0, None, 1000
    run.rules = reward_rules(cfg.rewards)
    run.steps = cfg.grpo.steps
    return run


def trained_prompts(r) -> list[int]:
    return sorted({it.prompt_ids[0] for it in r.items})


def test_without_dynamic_sampling_a_step_trains_on_its_slice():
    run = fake_run()
    r = run.rollout_step(0)
    assert [row["extra_info"]["index"] for row in r.rows] == [0, 1, 2, 3]
    assert (r.gen_rounds, r.zero_var_groups, r.trained_groups, run.cursor) == (1, 3, 4, 4)
    assert trained_prompts(r) == [0, 1, 2, 3]  # flat groups stay in, with zero advantage
    assert run.rollout.calls == [([0, 1, 2, 3], 7 * 1_000_003 + 0)]
    assert run.rollout_step(1).rows[0]["extra_info"]["index"] == 4


def test_dynamic_sampling_refills_from_the_schedule_until_the_step_is_informative():
    run = fake_run(prompts=2, dynamic_sampling=True)
    r = run.rollout_step(5)
    # round 1: 0, 1 flat; round 2: 2 kept, 3 flat; round 3: 4 flat; round 4: 5 kept
    assert run.rollout.calls == [
        ([0, 1], 7 * 1_000_003 + 5),  # the first round's seed is the step's, as without it
        ([2, 3], 7 * 1_000_003 + 5 + 1_000_000_007),
        ([4], 7 * 1_000_003 + 5 + 2 * 1_000_000_007),
        ([5], 7 * 1_000_003 + 5 + 3 * 1_000_000_007),
    ]
    assert (r.gen_rounds, r.zero_var_groups, r.trained_groups) == (4, 4, 2)
    assert trained_prompts(r) == [2, 5]
    assert len(r.prompts) == len(r.rows) == 6 and run.cursor == 6  # every drawn prompt counts
    assert all(it.advantage != 0 for it in r.items)
    # the next step continues the schedule where this one stopped
    assert run.rollout_step(6).rows[0]["extra_info"]["index"] == 6


def test_dynamic_sampling_stops_at_max_gen_rounds_and_trains_on_what_it_has():
    run = fake_run(prompts=4, dynamic_sampling=True, max_gen_rounds=2)
    r = run.rollout_step(0)
    # round 1: 0-3 (2 kept); round 2: the 3 missing, 4-6 (5 kept); it stops at 2 of 4
    assert (r.gen_rounds, r.trained_groups, trained_prompts(r)) == (2, 2, [2, 5])
    assert (run.cursor, r.zero_var_groups) == (7, 5)
    out = run.step(1)  # and the step logs it: 7-10 (8 kept), then 11-13 (11 kept)
    assert (out["gen_rounds"], out["zero_var_groups"], out["prompts_drawn"]) == (2, 5, 7)
    assert out["trained_groups"] == 2 and out["truncated_frac"] == pytest.approx(1 / 4)
    assert len(run.learners.batches[-1]) == 2 * N


def test_dynamic_sampling_stops_where_the_schedule_ends():
    run = fake_run(prompts=4, dynamic_sampling=True)
    run.cursor = 21  # 3 prompts left: 21 and 22 flat, 23 kept
    r = run.rollout_step(9)
    assert (r.gen_rounds, r.trained_groups, run.cursor) == (1, 1, 24)


def test_overlong_mask_leaves_truncated_responses_out_of_the_loss():
    plain = fake_run().rollout_step(0)
    masked = fake_run(overlong="mask").rollout_step(0)
    assert len(plain.items) == 4 * N and len(masked.items) == 4 * (N - 1)
    assert all(len(it.response_ids) < 4 for it in masked.items)
    assert any(len(it.response_ids) == 4 for it in plain.items)
    # the advantages still count the truncated sample: prompt 2's are those of its whole group
    adv = {len(it.response_ids): it.advantage for it in masked.items if it.prompt_ids == [2]}
    full = {len(it.response_ids): it.advantage for it in plain.items if it.prompt_ids == [2]}
    assert adv == {k: full[k] for k in (1, 2, 3)}


def test_overlong_penalty_shapes_the_rewards_the_advantages_see():
    plain = fake_run().rollout_step(0)
    shaped = fake_run(overlong="penalty", overlong_buffer=2).rollout_step(0)
    # prompt 0, all right: rewards 1, 1, 1 - 1/2, 1 - 1 by length (free up to 2 of 4 tokens)
    adv = [it.advantage for it in shaped.items if it.prompt_ids == [0]]
    assert adv == pytest.approx(group_advantages(torch.tensor([1.0, 1.0, 0.5, 0.0]), 4)[0].tolist())
    assert all(it.advantage == 0 for it in plain.items if it.prompt_ids == [0])
    # no group is flat any more: the wrong ones' rewards differ by length too
    assert (plain.zero_var_groups, shaped.zero_var_groups) == (3, 0)
    # the logged reward is the verifier's, unshaped
    assert torch.equal(shaped.scores, plain.scores)


def test_batch_std_normalises_over_the_trained_groups():
    run = fake_run(adv_norm="batch_std", adv_eps=0.0)
    r = run.rollout_step(0)
    # prompt 2's group is 1, 0, 1, 0 (centred +-0.5); with three flat groups the batch's std
    # of the 16 centred rewards is sqrt(4 * 0.25 / 15)
    adv = [it.advantage for it in r.items if it.prompt_ids == [2]]
    assert adv == pytest.approx([0.5 / math.sqrt(1 / 15), -0.5 / math.sqrt(1 / 15)] * 2)


# --- bad values ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key, expected",
    [
        (
            "grpo.policy_loss=ppo",
            "grpo.policy_loss",
            "expected one of ['ppo_clip', 'gspo', 'cispo']",
        ),
        (
            "grpo.adv_norm=std",
            "grpo.adv_norm",
            "expected one of ['group_std', 'none', 'batch_std']",
        ),
        ("grpo.loss_agg=sum", "grpo.loss_agg", "seq-mean-token-sum-norm"),
        ("grpo.pass_k=[1,4]", "grpo.pass_k", "grpo.eval_samples=2"),  # tiny draws 2
        ("grpo.pass_k=[0]", "grpo.pass_k", "distinct integers from 1"),
        ("grpo.max_gen_rounds=0", "grpo.max_gen_rounds", "an integer >= 1"),
        ("grpo.overlong_buffer=-1", "grpo.overlong_buffer", "a non-negative integer"),
        ("grpo.overlong=penalty", "grpo.overlong_buffer", "1 to grpo.max_new_tokens=16"),
        ("grpo.overlong=truncate", "grpo.overlong", "expected one of ['none', 'mask', 'penalty']"),
        ("grpo.gspo_clip_low=1.5", "grpo.gspo_clip_low", "a value in [0, 1)"),
        ("grpo.cispo_clip_high=-1", "grpo.cispo_clip_high", "a non-negative value"),
    ],
)
def test_bad_values_exit_2_before_any_actor_starts(started, capsys, override, key, expected):
    code = cli.main(["train", str(TINY), "--model", "tiny-3", "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and started == [], err
    assert str(TINY) in err and f"'{key}'" in err and expected in err and "Traceback" not in err


# --- a real run ------------------------------------------------------------------------------
@pytest.mark.vllm
def test_a_run_with_the_recipe_knobs_ends_when_its_schedule_is_drawn(ray_session, tmp_path):
    """vLLM, DeepSpeed and the RewardPool, with CISPO, Dr. GRPO's advantages and normaliser,
    dynamic sampling, overlong masking and pass@2: the run draws exactly its data budget,
    whatever number of steps that takes, and every row's pass@2 is at least its pass@1."""
    import json

    from rayrl.metrics import read_metrics
    from rayrl.trainer import train

    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        {
            "output_dir": str(tmp_path),
            "grpo.policy_loss": "cispo",
            "grpo.adv_norm": "none",
            "grpo.loss_agg": "seq-mean-token-sum-norm",
            "grpo.dynamic_sampling": True,
            "grpo.overlong": "mask",
            "grpo.pass_k": [1, 2],
        },
    )
    run_dir = train(cfg, Trial("smoke-1", "base", 4, 1, 0), tmp_path / "run", progress=False)
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    rows = read_metrics(run_dir / "metrics.parquet")
    assert sum(s["prompts_drawn"] for s in steps) == cfg.grpo.data_budget == 64
    assert rows["data_samples"].iloc[-1] == 64 and rows["step"].iloc[-1] == len(steps) <= 8
    # a step of several rounds drew more than prompts_per_step and trained on the informative
    for s in steps:
        assert s["trained_groups"] <= s["prompts_drawn"] and 0 <= s["truncated_frac"] <= 1
        assert s["trained_groups"] <= 8 and s["gen_rounds"] >= 1
        assert (s["gen_rounds"] > 1) == (s["prompts_drawn"] > 8)
    assert (rows["pass_at_2"] >= rows["pass_at_1"]).all()
    assert (rows["pass_at_1"] - (1 - rows["test_loss"])).abs().max() < 1e-9
    assert (rows["pass_at_2_sub"] >= rows["pass_at_1_sub"]).all()
    assert (run_dir / "checkpoints").is_dir()
