"""The data pipeline on the real guru files and the synthetic task."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import PreTrainedTokenizerFast

from rayrl.config import Config, DataConfig, load_config
from rayrl.data import (
    DataError,
    apply_template,
    curriculum_order,
    held_out_split,
    load_rows,
    load_task,
    pass_rate,
    render_prompt,
    reuse_schedule,
    synthetic_task,
)
from rayrl.data.loading import validate_rows
from rayrl.data.rows import problem
from rayrl.models.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]

BUDGET = 51_200  # D_total of the paper's reuse experiments
SAMPLED = re.compile(r"math__sampled_1_(\d+)_(\d+)\.parquet")


@pytest.fixture(scope="module")
def held_out_file(guru_dir: Path) -> Path:
    return guru_dir / "math_curriculum" / "math__full_difficulty_ordered_test_500.parquet"


@pytest.fixture(scope="module")
def pool(guru_dir: Path) -> list[dict]:
    """The largest training set on these machines: 12,800 problems."""
    return load_rows(
        str(guru_dir / "math_curriculum_sampled" / "math__sampled_1_4_12800.parquet")
    ).rows


def key(row: dict) -> str:
    return row["prompt"][-1]["content"]


def non_increasing(xs: list[float]) -> bool:
    return all(a >= b for a, b in zip(xs, xs[1:]))


def ks_distance(a: list[float], b: list[float]) -> float:
    """Largest gap between the two empirical CDFs."""
    return max(
        abs(sum(x <= v for x in a) / len(a) - sum(x <= v for x in b) / len(b))
        for v in set(a) | set(b)
    )


# --- the real guru files ---------------------------------------------------------------


def test_held_out_file_has_500_rows_ordered_easy_first(held_out_file: Path):
    loaded = load_rows(str(held_out_file))
    assert len(loaded.rows) == 500 and loaded.malformed == []
    rates = [pass_rate(r) for r in loaded.rows]
    assert non_increasing(rates) and rates[0] > rates[-1]
    assert {r["extra_info"]["split"] for r in loaded.rows} == {"test"}


def test_reuse_subsets_are_n_unique_rows_with_n_tau_51200(guru_dir: Path):
    files = sorted((guru_dir / "math_curriculum_sampled").glob("math__sampled_1_*.parquet"))
    assert len(files) == 7
    for f in files:
        tau, n = map(int, SAMPLED.fullmatch(f.name).groups())
        loaded = load_rows(str(f))
        assert len(loaded.rows) == n and not loaded.malformed, f.name
        assert n * tau == BUDGET, f.name
        assert len({key(r) for r in loaded.rows}) == n, f.name
        assert non_increasing([pass_rate(r) for r in loaded.rows]), f.name


def test_folder_loads_every_file(guru_dir: Path):
    loaded = load_rows(str(guru_dir / "online_eval"))
    per_source = Counter(r["data_source"] for r in loaded.rows)
    assert per_source["openai/gsm8k"] == 1319 and per_source["math__math"] == 500
    assert sum(per_source.values()) == 30 + 40 + 1319 + 500 + 164 + 200 + 200
    assert {r["ability"] for r in loaded.rows} == {"math", "codegen", "logical_reasoning", "stem"}


def test_unknown_dataset_name_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network wait in tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-data.*not a parquet file"):
        load_rows("no-such-org/no-such-data")


def test_empty_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match="no .parquet files"):
        load_rows(str(tmp_path))


# --- malformed rows ----------------------------------------------------------------------


def test_malformed_rows_are_counted_reported_and_skipped(
    held_out_file: Path, tmp_path: Path, caplog
):
    good = load_rows(str(held_out_file)).rows[:6]
    rows = [dict(r) for r in good]
    rows[1] = {**rows[1], "reward_model": {"style": "rule", "ground_truth": None}}
    rows[3] = {**rows[3], "prompt": []}
    rows[4] = {**rows[4], "prompt": [{"role": "user", "content": "   "}]}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with caplog.at_level(logging.WARNING, logger="rayrl.data.loading"):
        loaded = load_rows(str(path))
    assert [key(r) for r in loaded.rows] == [key(good[i]) for i in (0, 2, 5)]
    assert [(m.file, m.index) for m in loaded.malformed] == [
        (str(path), 1),
        (str(path), 3),
        (str(path), 4),
    ]
    assert [m.reason for m in loaded.malformed] == [
        "no ground truth",
        "prompt is not a non-empty list of messages",
        "prompt[0] has empty content",
    ]
    assert "skipped 3 malformed rows" in caplog.text and "bad.parquet" in caplog.text


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"reward_model": None}, "no ground truth"),
        ({"reward_model": {"style": "rule", "ground_truth": ""}}, "no ground truth"),
        ({"prompt": "just a string"}, "prompt is not a non-empty list of messages"),
        ({"prompt": [{"content": "no role"}]}, "prompt[0] has no role"),
        ({"data_source": ""}, "no data_source"),
        ({"ability": None}, "no ability"),
        ({"extra_info": [1, 2]}, "extra_info is not a mapping"),
    ],
)
def test_each_kind_of_malformed_row(change: dict, reason: str):
    row = synthetic_task(1, 1, 1, 0, eval_size=1)[0][0]
    assert problem(row) is None
    result = validate_rows([row, {**row, **change}, "not a row"], "mem")
    assert len(result.rows) == 1
    assert [(m.index, m.reason) for m in result.malformed] == [
        (1, reason),
        (2, "expected a mapping, got str"),
    ]


# --- curriculum and held-out split ---------------------------------------------------------


def test_curriculum_order_is_easy_first_and_stable(pool: list[dict]):
    shuffled = pool[::-1]
    ordered = curriculum_order(shuffled)
    assert non_increasing([pass_rate(r) for r in ordered])
    assert Counter(map(key, ordered)) == Counter(map(key, pool))
    # Ties keep their input order.
    tied = [r for r in shuffled if pass_rate(r) == 0.0]
    assert [key(r) for r in ordered if pass_rate(r) == 0.0] == [key(r) for r in tied]


def test_pass_rate_missing_names_the_row():
    row = {"data_source": "x", "extra_info": {"index": 7}}
    with pytest.raises(KeyError, match="row 7 of x has no difficulty"):
        pass_rate(row)


def test_held_out_split_is_disjoint_and_seeded(pool: list[dict]):
    rows = pool[:2000]
    train, test = held_out_split(rows, 500, seed=0)
    assert len(test) == 500 and len(train) == 1500
    assert not {key(r) for r in train} & {key(r) for r in test}
    assert {key(r) for r in train} | {key(r) for r in test} == {key(r) for r in rows}
    assert non_increasing([pass_rate(r) for r in test])  # input order kept
    assert [key(r) for r in held_out_split(rows, 500, seed=0)[1]] == [key(r) for r in test]
    assert {key(r) for r in held_out_split(rows, 500, seed=1)[1]} != {key(r) for r in test}
    with pytest.raises(ValueError, match="held-out size"):
        held_out_split(rows, 2000, seed=0)


# --- the reuse schedule (paper appendix A.4) -------------------------------------------------


@pytest.mark.parametrize("tau", [4, 25, 100])
def test_reuse_schedule_repeats_one_ordered_subset_tau_times(pool: list[dict], tau: int):
    schedule = reuse_schedule(pool, BUDGET, tau, seed=0)
    unique = BUDGET // tau
    assert len(schedule) == BUDGET
    passes = [schedule[i * unique : (i + 1) * unique] for i in range(tau)]
    first = [key(r) for r in passes[0]]
    assert len(set(first)) == unique
    assert all([key(r) for r in p] == first for p in passes)  # same order on every pass
    assert set(Counter(map(key, schedule)).values()) == {tau}
    assert non_increasing([pass_rate(r) for r in passes[0]])


def test_a_shuffled_schedule_mixes_difficulties_in_every_stretch(pool: list[dict]):
    tau, unique = 4, BUDGET // 4
    easy_first = reuse_schedule(pool, BUDGET, tau, seed=0)
    shuffled = reuse_schedule(pool, BUDGET, tau, seed=0, order="shuffled")
    assert [key(r) for r in shuffled] == [
        key(r) for r in reuse_schedule(pool, BUDGET, tau, 0, "shuffled")
    ]
    assert sorted(map(key, shuffled[:unique])) == sorted(map(key, easy_first[:unique]))
    assert all(shuffled[i] is shuffled[i % unique] for i in range(BUDGET))  # same order each pass
    # The curriculum's last quarter is its hardest; a shuffled one is like the whole.
    quarter = unique // 4
    mean = lambda rows: sum(map(pass_rate, rows)) / len(rows)  # noqa: E731
    whole = mean(shuffled[:unique])
    assert mean(easy_first[unique - quarter : unique]) < whole - 0.1
    assert abs(mean(shuffled[unique - quarter : unique]) - whole) < 0.05
    with pytest.raises(ValueError, match="DataConfig.order"):
        reuse_schedule(pool, BUDGET, tau, seed=0, order="random")


@pytest.mark.parametrize("tau", [10, 50, 100])
def test_reuse_subset_keeps_the_difficulty_distribution(pool: list[dict], guru_dir: Path, tau: int):
    unique = BUDGET // tau
    subset = reuse_schedule(pool, BUDGET, tau, seed=3)[:unique]
    pool_rates = [pass_rate(r) for r in pool]
    # Stratified: the CDFs agree to one stratum; a plain random draw misses by ~1/sqrt(unique).
    assert ks_distance([pass_rate(r) for r in subset], pool_rates) <= 2 / unique
    # As close to the pool as the paper's own subset of the same size.
    shipped = load_rows(
        str(guru_dir / "math_curriculum_sampled" / f"math__sampled_1_{tau}_{unique}.parquet")
    )
    assert (
        ks_distance([pass_rate(r) for r in subset], pool_rates)
        <= ks_distance([pass_rate(r) for r in shipped.rows], pool_rates) + 2 / unique
    )


def test_reuse_subsets_are_independent_per_seed(pool: list[dict]):
    unique = 512
    a = {key(r) for r in reuse_schedule(pool, BUDGET, 100, seed=0)[:unique]}
    b = {key(r) for r in reuse_schedule(pool, BUDGET, 100, seed=1)[:unique]}
    again = {key(r) for r in reuse_schedule(pool, BUDGET, 100, seed=0)[:unique]}
    assert a == again
    expected_overlap = unique * unique / len(pool)  # ~20 for independent draws
    assert len(a & b) < 3 * expected_overlap
    # Independent, not nested: a smaller subset is not drawn inside a larger one.
    big = {key(r) for r in reuse_schedule(pool, BUDGET, 10, seed=0)[: BUDGET // 10]}
    assert not a <= big


def test_reuse_schedule_errors(pool: list[dict]):
    with pytest.raises(ValueError, match="tau=3 must divide the data budget 51200"):
        reuse_schedule(pool, BUDGET, 3, seed=0)
    with pytest.raises(ValueError, match="needs 51200 unique prompts; the pool has 12800"):
        reuse_schedule(pool, BUDGET, 1, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        reuse_schedule(pool, BUDGET, 0, seed=0)


# --- templates and prompt rendering ---------------------------------------------------------


def test_templates_wrap_the_question():
    q = "What is 2+2?"
    math = apply_template("math", q)
    assert math.startswith("You are a knowledgeable math assistant.")
    assert math.endswith(f"\n{q}\nPlease output the final answer within \\boxed{{}}.")
    assert apply_template("code", q).endswith(f"signature or docstring.\n{q}")
    assert apply_template("codegen", q) == apply_template("code", q)
    logic = apply_template("logical_reasoning", q)
    assert (
        logic.startswith(f"Solve the following puzzle\n{q}\n") and '{"header": ["Position"' in logic
    )
    assert "\\boxed{A}" in apply_template("stem", q) and q in apply_template("stem", q)
    with pytest.raises(KeyError, match="no prompt template for ability 'poetry'"):
        apply_template("poetry", q)


def test_render_prompt_uses_the_chat_template_only_when_there_is_one():
    row = synthetic_task(1, 1, 1, 0, eval_size=1)[1][0]
    tok = build_tokenizer()
    assert render_prompt(row, tok) == row["prompt"][0]["content"]
    chat: PreTrainedTokenizerFast = build_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    )
    assert render_prompt(row, chat) == f"<user>{row['prompt'][0]['content']}<assistant>"


# --- the synthetic task -----------------------------------------------------------------


def solve(prompt: str) -> int:
    """Independent check of the generator's answers."""
    expr = re.fullmatch(r"Q:([\d+-]+)=\?A:", prompt).group(1)
    terms = re.findall(r"[+-]?\d+", expr)
    return sum(int(t) for t in terms)


def test_synthetic_task_is_deterministic_by_seed():
    a = synthetic_task(3000, 500, 3, seed=0)
    assert a == synthetic_task(3000, 500, 3, seed=0)
    b = synthetic_task(3000, 500, 3, seed=1)
    assert [key(r) for r in a[1]] != [key(r) for r in b[1]]
    # The held-out set does not move when the training size changes.
    assert synthetic_task(1000, 500, 3, seed=0)[1] == a[1]


def test_synthetic_rows_are_valid_guru_rows_with_correct_answers():
    train, test, evals = synthetic_task(3000, 500, 3, seed=0)
    assert len(train) == 3000 and len(test) == 500
    assert set(evals) == {"add_uneven", "sub", "add_long"}
    for rows in [train, test, *evals.values()]:
        for r in rows:
            assert problem(r) is None and r["data_source"].startswith("synthetic_arith")
            assert int(r["reward_model"]["ground_truth"]) == solve(r["prompt"][0]["content"])
            assert 0 < pass_rate(r) <= 1
    assert {r["extra_info"]["level"] for r in test} == {1, 2, 3}
    assert {r["extra_info"]["level"] for r in evals["add_long"]} == {4}  # out of domain: longer
    assert all("-" in key(r) for r in evals["sub"])  # out of domain: never-trained operation


def test_synthetic_held_out_is_disjoint_from_training():
    train, test, evals = synthetic_task(20000, 500, 3, seed=0)
    held = {key(r) for r in test}
    assert len(held) == 500
    assert not held & {key(r) for r in train}
    assert not held & {key(r) for r in evals["add_uneven"]}
    assert len({key(r) for r in train}) == len(train)


def test_load_task_synthetic_is_curriculum_ordered():
    cfg = Config(data=DataConfig(train_size=2000, test_size=200, eval_size=50))
    task = load_task(cfg)
    assert len(task.train) == 2000 and len(task.test) == 200
    assert non_increasing([pass_rate(r) for r in task.train])
    assert task.train[0]["extra_info"]["level"] == 1 and task.train[-1]["extra_info"]["level"] == 3
    assert {len(v) for v in task.evals.values()} == {50} and task.malformed == []


def test_load_task_guru(guru_dir: Path):
    cfg = Config(
        data=DataConfig(
            source="guru",
            train_path=str(
                guru_dir / "math_curriculum_sampled" / "math__sampled_1_100_512.parquet"
            ),
            test_path=str(
                guru_dir / "math_curriculum" / "math__full_difficulty_ordered_test_500.parquet"
            ),
            eval_paths=[str(guru_dir / "online_eval" / "aime2024.parquet")],
        )
    )
    task = load_task(cfg)
    assert (len(task.train), len(task.test), len(task.evals["aime2024"])) == (512, 500, 30)
    assert non_increasing([pass_rate(r) for r in task.train])


def test_prompt_styles_ask_the_same_problems_in_their_own_words():
    compact = synthetic_task(20, 5, 1, seed=0, eval_size=2)
    math = synthetic_task(20, 5, 1, seed=0, eval_size=2, style="math")
    for a, b in zip(compact[1], math[1]):
        q = a["prompt"][0]["content"]  # "Q:3+4=?A:"
        x, y = q.removeprefix("Q:").removesuffix("=?A:").split("+")
        assert math_prompt(b) == apply_template("math", f"What is {x} plus {y}?")
        assert a["reward_model"] == b["reward_model"]
    assert "minus" in math_prompt(math[2]["sub"][0])
    calc = synthetic_task(20, 5, 1, seed=0, eval_size=2, style="calc")
    for a, c in zip(compact[1], calc[1]):
        x, y = math_prompt(a).removeprefix("Q:").removesuffix("=?A:").split("+")
        assert math_prompt(c) == f"Calculate {x} + {y}. Give the final answer as \\boxed{{number}}."
        assert a["reward_model"] == c["reward_model"]
    assert " - " in math_prompt(calc[2]["sub"][0])


def math_prompt(row):
    return row["prompt"][0]["content"]


def test_eval_paths_add_a_seeded_subset_of_each_file_to_any_task(guru_dir):
    gsm8k = str(guru_dir / "online_eval" / "gsm8k.parquet")
    overrides = {"data.eval_paths": [gsm8k], "data.eval_size": 5}
    task = load_task(load_config(ROOT / "configs" / "smoke.yaml", overrides))
    assert set(task.evals) == {"add_uneven", "sub", "add_long", "gsm8k"}
    assert len(task.evals["gsm8k"]) == 5 and len(task.evals["sub"]) == 5
    again = load_task(load_config(ROOT / "configs" / "smoke.yaml", overrides))
    assert again.evals["gsm8k"] == task.evals["gsm8k"]
    other = load_task(load_config(ROOT / "configs" / "smoke.yaml", {**overrides, "data.seed": 1}))
    assert other.evals["gsm8k"] != task.evals["gsm8k"]
