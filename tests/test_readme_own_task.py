"""The README's "Your own model, data and reward": every block run as a user would paste it
(issue 35). Ray and the training loop are stubbed; what runs is the CLI up to Ray's start,
the data and the reward function, for real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from huggingface_hub import constants

import rayrl.cli as cli
from rayrl.config import load_config
from rayrl.data import load_task
from rayrl.models.qwen import init_model, save_model_dir
from rayrl.models.tokenizer import build_tokenizer
from rayrl.rewards import score_detailed
from rayrl.rewards.custom import reward_rules, route, score_custom

ROOT = Path(__file__).resolve().parents[1]


def blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the section."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\n## Your own model, data and reward\n(.*?)\n## ", readme, re.S)
    assert section, "README section missing"
    return re.findall(r"```(\w+)\n(.*?)```", section.group(1), re.S)


def command(text: str) -> list[str]:
    """A `rayrl ...` block as argv, backslash continuations joined."""
    argv = shlex.split(text.replace("\\\n", " "))
    assert argv[0] == "rayrl"
    return argv[1:]


def test_the_section_has_its_blocks():
    assert [lang for lang, _ in blocks()] == ["bash", "bash", "bash", "yaml"]


def test_hub_model_block(tmp_path, monkeypatch, started, capsys):
    (_, text), *_ = blocks()
    argv = command(text)
    repo = argv[argv.index("--model") + 1]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main(argv) == 2  # not cached: where to put the files
    err = capsys.readouterr().err
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    assert f"{folder}/snapshots/<revision>/" in err and started == []
    # cached, as a download leaves it (a small stand-in for the real model)
    tok = build_tokenizer()
    from rayrl.config import ModelSpec

    spec = ModelSpec("x", hidden=64, layers=1, heads=2, kv_heads=1)
    save_model_dir(init_model(spec, tok), tok, folder / "snapshots" / "abc")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    assert cli.main(argv) == 0, capsys.readouterr().err
    cfg, trial = started[-1]
    assert (trial.model, trial.family) == (repo.split("/")[1], "instruct")


def test_data_reward_and_train_blocks(tmp_path, monkeypatch, started, capsys):
    _, (_, make), (_, train), (_, config) = blocks()
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # "from the repository root"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-ec", make], cwd=tmp_path, env=env, check=True, timeout=120)
    mytask = tmp_path / "mytask"
    assert {p.name for p in mytask.iterdir()} == {"my_rewards.py", "train.jsonl", "test.jsonl"}

    monkeypatch.chdir(mytask)
    assert cli.main(command(train)) == 0, capsys.readouterr().err
    cfg, trial = started[-1]
    assert trial.model == "tiny-3" and cfg.grpo.data_budget == 64
    assert cfg.data.train_path == str(mytask / "train.jsonl")
    assert cfg.rewards.custom == {"mytask*": f"{mytask / 'my_rewards.py'}:score"}

    task = load_task(cfg)
    assert (len(task.train), len(task.test)) == (256, 64)
    rule = route(reward_rules(cfg.rewards), task.test[0]["data_source"])
    assert rule is not None and rule.ref.endswith("my_rewards.py:score")
    for row in task.test[:8]:  # scores as rayrl's math verifier does on these answers
        gt = row["reward_model"]["ground_truth"]
        for text in (f"so \\boxed{{{gt}}}", f"\\boxed{{{int(gt) + 1}}}", gt):
            want = score_detailed("math", text, gt).score
            assert score_custom(rule, text, gt, row, 10.0).score == want, text

    # the config-file form of the same run, in mytask/
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw.update(yaml.safe_load(config))
    raw["data"] = {**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]}
    raw["data"].update(yaml.safe_load(config)["data"])
    (mytask / "mine.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir("/")
    mine = load_config(mytask / "mine.yaml")
    assert (mine.data.train_path, mine.data.test_path) == (cfg.data.train_path, cfg.data.test_path)
    assert mine.rewards.custom == cfg.rewards.custom
    shutil.rmtree(mytask)
