"""rewards.custom: a user's reward function, routed by data_source glob, isolated and timed out
like rayrl's verifiers, checked before any actor starts (issue 35)."""

from __future__ import annotations

import logging
import time
import types
from pathlib import Path

import pytest
import yaml

from rayrl import cli
from rayrl.config import ConfigError, load_config
from rayrl.data import synthetic_task
from rayrl.rewards import score_detailed
from rayrl.rewards.custom import CustomRewardError, Rule, route, score_custom
from rayrl.trainer import reward_items

FIXTURES = Path(__file__).parent / "fixtures"
USER = FIXTURES / "reward_user.py"


def rows(n: int) -> list[dict]:
    """Synthetic rows with extra_info.index 0..n-1."""
    train, _, _ = synthetic_task(n, 4, 2, 0, eval_size=1)
    return [{**r, "extra_info": {**r["extra_info"], "index": i}} for i, r in enumerate(train)]


def responses(row: dict) -> list[str]:
    """A right, a wrong and an unanswered response to `row`."""
    gt = row["reward_model"]["ground_truth"]
    return [f"so \\boxed{{{gt}}}", f"\\boxed{{{int(gt) + 1}}}", "no idea"]


def config(tmp_path: Path, custom: dict, **extra) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"rewards": {"custom": custom, **extra}}))
    return path


# --- config: forms, relative paths, errors before any actor starts ------------------------


def test_file_reference_resolves_against_the_config_folder(tmp_path: Path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.py").write_text(USER.read_text())
    monkeypatch.chdir(FIXTURES)  # the working directory plays no part
    cfg = load_config(config(tmp_path, {"synthetic*": "sub/mine.py:boxed_exact"}))
    assert cfg.rewards.custom == {"synthetic*": f"{tmp_path / 'sub' / 'mine.py'}:boxed_exact"}


@pytest.mark.parametrize(
    "ref, why",
    [
        ("missing.py:score", "ImportError: no such file"),
        (f"{USER}:nope", "has no attribute 'nope'"),
        (f"{USER}:NOT_CALLABLE", "is a float, not a function"),
        (f"{USER}:two_args", "cannot be called as fn(response, ground_truth, row)"),
        ("no_such_module_xyz:score", "ModuleNotFoundError"),
        ("just_a_name", "expected 'package.module:function' or 'path/to/file.py:function'"),
        (7, "a string, got a int"),
    ],
)
def test_a_bad_function_is_refused_naming_the_key(tmp_path: Path, ref, why: str, capsys):
    path = config(tmp_path, {"synthetic*": ref})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and 'rewards.custom["synthetic*"]' in str(e.value)
    assert why in str(e.value)
    # the CLI: exit 2 with that message, before Ray starts
    assert cli.main(["train", str(path), "--model", "tiny-3"]) == 2
    err = capsys.readouterr().err
    assert 'rewards.custom["synthetic*"]' in err and why in err and "Traceback" not in err


def test_max_failure_share_is_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="rewards.max_failure_share.*a share in"):
        load_config(config(tmp_path, {}, max_failure_share=1.5))


def test_first_matching_glob_wins_and_unmatched_rows_keep_rayrl_verifiers():
    rules = (Rule("math__*", "a.py:f"), Rule("*arith", "b.py:g"), Rule("synthetic*", "c.py:h"))
    assert route(rules, "synthetic_arith").ref == "b.py:g"
    assert route(rules, "math__deepscaler").ref == "a.py:f"
    assert route(rules, "openai/gsm8k") is None
    rs = rows(2) + [{**rows(1)[0], "data_source": "openai/gsm8k"}]
    groups = [[types.SimpleNamespace(token_ids=[i])] * 2 for i in range(3)]
    tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: f"text{ids[0]}")
    items = reward_items(rs, groups, tok, rules)
    assert [len(it) for it in items] == [5, 5, 5, 5, 3, 3]
    assert items[0][3] is rs[0] and items[0][4].ref == "b.py:g" and items[1][1] == "text0"
    assert items[4] == ("openai/gsm8k", "text2", rs[2]["reward_model"]["ground_truth"])


# --- the isolated call: same verdicts as the built-in, and hostile functions -----------------


def test_user_function_scores_as_the_builtin_verifier():
    rule = Rule("synthetic*", f"{USER}:boxed_exact")
    for row in rows(5):
        gt = row["reward_model"]["ground_truth"]
        for text in responses(row):
            want = score_detailed(row["data_source"], text, gt).score
            assert score_custom(rule, text, gt, row, 10.0).score == want, text


def test_hostile_functions_score_zero_and_nothing_hangs():
    row = rows(1)[0]
    timeout = 1.0
    cases = {
        "hang": ("timeout", "timed out after 1s"),
        "raise_on_odd": ("error", "ValueError: cannot parse"),
        "not_a_number": ("error", "returned 'yes', expected a finite float"),
        "exit_process": ("error", "the worker process failed"),
    }
    odd = {**row, "extra_info": {**row["extra_info"], "index": 1}}
    for name, (reason, text) in cases.items():
        rule = Rule("*", f"{USER}:{name}")
        score_custom(rule, "warm", "1", row, 10.0)  # the zygote's start is not under test
        start = time.monotonic()
        v = score_custom(rule, "\\boxed{1}", "1", odd, timeout)
        assert time.monotonic() - start < timeout + 1.5, name
        assert (v.score, v.reason) == (0.0, reason) and text in v.error, (name, v)
    # after a kill the next call is served at once by a fresh worker
    rule = Rule("*", f"{USER}:hang_on_odd")
    assert score_custom(rule, "x", "1", odd, timeout).reason == "timeout"
    start = time.monotonic()
    assert score_custom(rule, "\\boxed{1}", "1", row, timeout).score == 1.0
    assert time.monotonic() - start < 1.0


# --- in the RewardPool on a real Ray ------------------------------------------------------


def test_pool_routes_custom_rows_and_stops_over_the_failure_share(ray_session, caplog):
    from rayrl.rewards.pool import RewardPool

    pool = RewardPool(num_workers=2, timeout_s=1.0, num_cpus_per_worker=0.25)
    try:
        rs = rows(8)
        mixed = [{**r, "data_source": "mytask_a"} if i < 4 else r for i, r in enumerate(rs)]
        groups = [[types.SimpleNamespace(text=t) for t in responses(r)] for r in mixed]
        tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: ids)
        for g in groups:
            for s in g:
                s.token_ids = s.text

        # a user function from a test module (on the workers' PYTHONPATH), for mytask* only
        rules = (Rule("mytask*", "fixtures.reward_user:boxed_exact", 0.5),)
        items = reward_items(mixed, groups, tok, rules)
        verdicts = pool.score(items)
        builtin = [score_detailed("synthetic_arith", it[1], it[2]).score for it in items]
        assert [v.score for v in verdicts] == builtin == [1.0, 0.0, 0.0] * 8
        assert [v.reason for v in verdicts[:3]] == ["matched", "wrong", "wrong"]  # custom
        assert [v.reason for v in verdicts[-3:]] == ["matched", "wrong", "no_answer"]  # built-in

        # hostile: half the custom calls hang, the other half score; under a share of 0.6
        # the batch is scored, the failures logged with their rows' indices
        hostile = (Rule("mytask*", f"{USER}:hang_on_odd", 0.6),)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rayrl.rewards.custom"):
            verdicts = pool.score(reward_items(mixed, groups, tok, hostile))
        assert time.monotonic() - start < 60
        scored, hung = ["matched", "wrong", "wrong"], ["timeout"] * 3
        assert [v.reason for v in verdicts[:12]] == scored + hung + scored + hung
        assert "6 of 12 calls in this batch failed (6 timed out)" in caplog.text
        assert "rows [1, 1, 1, 3, 3, 3]" in caplog.text
        assert pool.metrics()["timeouts"] >= 6

        # over the share: the run stops with the function's own error and the row's index
        raising = (Rule("mytask*", f"{USER}:raise_on_odd", 0.25),)
        with pytest.raises(CustomRewardError) as e:
            pool.score(reward_items(mixed, groups, tok, raising))
        msg = str(e.value)
        assert "6 of 12 calls in this batch failed (6 raised)" in msg
        assert "over rewards.max_failure_share=0.25" in msg
        assert "row 1:" in msg and "ValueError: cannot parse" in msg and "raise_on_odd" in msg
        # and the pool still serves
        assert pool.score(items)[0].score == 1.0
    finally:
        pool.shutdown()


# --- a real run ---------------------------------------------------------------------------


@pytest.mark.vllm
def test_a_run_scored_by_a_user_function_matches_the_builtin_verifiers(ray_session, tmp_path):
    """The same smoke run twice, on warm pools: scored by rayrl's synthetic verifier, then by
    reward_user.boxed_exact (a file outside rayrl/), which scores as it does: the same rows."""
    import ray

    import rayrl.pools
    from rayrl.metrics import read_metrics
    from rayrl.trainer import train
    from rayrl.trial import Trial

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    custom = {"rewards.custom": {"synthetic*": f"{USER}:boxed_exact"}}
    spec = Trial("smoke-1", "base", 4, 1, 0)
    warm = rayrl.pools.WarmPools()
    try:
        for name, extra in (("builtin", {}), ("custom", custom)):
            cfg = load_config(smoke, {"grpo.data_budget": 32, **extra})
            train(cfg, spec, tmp_path / name, progress=False, warm=warm)
        # the second run's rows went to the function, in the reward actors' isolated workers
        (actor,) = warm.pools.rewards.actors
        assert ray.get(actor.custom_functions.remote()) == [f"{USER}:boxed_exact"]
    finally:
        warm.shutdown()
    builtin, mine = (read_metrics(tmp_path / n / "metrics.parquet") for n in ("builtin", "custom"))
    assert builtin["step"].tolist() == [0, 2, 4]
    for col in ("test_loss", "test_loss_se"):
        assert mine[col].tolist() == builtin[col].tolist(), col
