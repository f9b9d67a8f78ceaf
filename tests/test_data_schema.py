"""Your own data (issue 35): rayrl/data/SCHEMA.md's schema, files in it, rows out of it refused before
Ray starts naming file, row and field, and config paths taken from the config's folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import rayrl.cli as cli
from rayrl.config import ConfigError, load_config
from rayrl.data import DataError, load_rows, load_task, pass_rate
from rayrl.data.rows import REQUIRED

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "rayrl" / "data" / "SCHEMA.md"


def example_row() -> dict:
    """The example row of rayrl/data/SCHEMA.md, as the page prints it."""
    block = re.search(r"## An example row\n\n```json\n(.*?)```", DOC.read_text(), re.S)
    return json.loads(block.group(1))


def mine(n: int) -> list[dict]:
    row = example_row()
    return [
        {
            **row,
            "prompt": [{"role": "user", "content": f"What is {i} + 30? Box it."}],
            "reward_model": {"ground_truth": str(i + 30)},
            "extra_info": {"index": i, "pass_rate": (i % 4) / 4},
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_docs_example_row_and_its_fields_are_the_schema(tmp_path: Path):
    doc = DOC.read_text()
    for name in REQUIRED:
        assert f"| `{name}` | yes |" in doc, name
    loaded = load_rows(str(write_jsonl(tmp_path / "one.jsonl", [example_row()])), difficulty=True)
    assert len(loaded.rows) == 1 and not loaded.malformed
    assert pass_rate(loaded.rows[0]) == 0.75


def test_parquet_jsonl_and_json_files_hold_the_same_rows(tmp_path: Path):
    rows = mine(6)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    got = [load_rows(str(tmp_path / f"a.{ext}")).rows for ext in ("parquet", "jsonl", "json")]
    assert got[0] == got[1] == got[2] and len(got[0]) == 6
    (tmp_path / "bad.jsonl").write_text('{"data_source": "x"\n')
    with pytest.raises(DataError, match="bad.jsonl: not a .parquet, .jsonl or .json file"):
        load_rows(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    "drop, field",
    [
        (("data_source",), "data_source"),
        (("ability",), "ability"),
        (("prompt",), "prompt"),
        (("reward_model", "ground_truth"), "reward_model.ground_truth"),
        (("extra_info", "pass_rate"), "extra_info.pass_rate"),
    ],
)
def test_a_row_missing_a_field_is_refused_naming_file_row_and_field(tmp_path, drop, field):
    rows = mine(5)
    node = rows[3]
    for part in drop[:-1]:
        node = node[part]
    del node[drop[-1]]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_rows(str(path), difficulty=True)
    assert str(e.value).startswith(f"{path}: row 3: no field '{field}'")
    if field == "extra_info.pass_rate":  # only the training file needs a difficulty
        assert len(load_rows(str(path)).rows) == 5


def test_train_refuses_a_bad_file_before_ray_starts(tmp_path, started, capsys):
    rows = mine(40)
    del rows[17]["ability"]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", mine(8))
    cfg = tmp_path / "mine.yaml"  # tiny.yaml beside the data: the paths below are relative
    cfg.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    overrides = ["data.source=guru", "data.train_path=train.jsonl", "data.test_path=test.jsonl"]
    args = ["train", str(cfg), "--model", "tiny-3"] + [f"--set={o}" for o in overrides]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{train}: row 17: no field 'ability'" in err and started == []
    del rows[17]
    write_jsonl(train, rows)
    assert cli.main(args) == 0 and started[0] == "ray" and len(started) == 2


def test_relative_paths_are_taken_from_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", mine(40))
    write_jsonl(tmp_path / "data" / "test.jsonl", mine(8))
    cfg = tmp_path / "cfgs" / "mine.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "source": "guru",
                    "train_path": "../data/train.jsonl",
                    "test_path": "${MY_DATA:-../data}/test.jsonl",
                    "eval_paths": ["openai/gsm8k"],  # a `datasets` name is kept as it is
                }
            }
        )
    )
    monkeypatch.chdir("/")  # not where the paths are relative to
    monkeypatch.delenv("MY_DATA", raising=False)
    d = load_config(cfg).data
    assert d.train_path == str(tmp_path / "data" / "train.jsonl")
    assert d.test_path == str(tmp_path / "data" / "test.jsonl")
    assert d.eval_paths == ["openai/gsm8k"]
    task = load_task(load_config(cfg, {"data.eval_paths": []}))
    assert len(task.train) == 40 and len(task.test) == 8
    monkeypatch.setenv("MY_DATA", "/elsewhere")
    assert load_config(cfg).data.test_path == "/elsewhere/test.jsonl"
    cfg.write_text(yaml.safe_dump({"data": {"source": "guru", "train_path": "${NOPE}/t.jsonl"}}))
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match=r"key 'data.train_path' names \$\{NOPE\}, which is not"):
        load_config(cfg)


def test_shipped_configs_resolve_their_data_from_anywhere(monkeypatch, tmp_path, guru_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYRL_GURU_DIR", str(guru_dir))
    for name in ("smollm2", "qwen2.5-base", "qwen2.5-instruct", "llama3-instruct"):
        d = load_config(ROOT / "configs" / f"{name}.yaml").data
        for path in [p for p in (d.train_path, d.test_path) if p] + d.eval_paths:
            assert Path(path).is_file(), (name, path)
    monkeypatch.delenv("RAYRL_GURU_DIR")  # smollm2's default: shared/ beside the repository
    (path,) = load_config(ROOT / "configs" / "smollm2.yaml").data.eval_paths
    assert path == str(ROOT.parent / "shared" / "data" / "guru" / "online_eval" / "gsm8k.parquet")
