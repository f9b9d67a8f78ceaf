"""Checkpoints that can be trusted (rayrl/checkpoint.py): a manifest written last, the newest
grpo.checkpoint_keep kept, a corrupt one named and passed over on resume; and the HF export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from rayrl import checkpoint
from rayrl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def fake_save(ckpt_dir: Path, step: int, keep: int = 2) -> Path:
    """What the learners and the loop write for step `step`, then sealed."""
    path = checkpoint.prepare(ckpt_dir, step)
    (path / "sub").mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (step + 1))
    (path / "sub" / "shard.pt").write_bytes(b"x" * 1000 * step)
    checkpoint.seal(path, {"step": step, "unique": [step]}, keep)
    return path


def test_a_sealed_checkpoint_verifies_and_each_kind_of_damage_is_named(tmp_path):
    path = fake_save(tmp_path, 4)
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "state.json", "sub/shard.pt"]
    assert manifest["files"]["sub/shard.pt"]["size"] == 4000
    assert checkpoint.verify(path) is None

    states = path / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[:-7])  # truncated: a kill mid-write
    assert "holds 1273 bytes, its manifest says 1280" in checkpoint.verify(path)
    assert "holds" in checkpoint.verify(path, checksums=False)
    states.write_bytes(data[:100] + b"\xff" + data[101:])  # same size, a byte changed
    assert checkpoint.verify(path) == "mp_rank_00_model_states.pt fails its CRC-32"
    assert checkpoint.verify(path, checksums=False) is None  # sizes alone cannot see it
    states.write_bytes(data)
    (path / "sub" / "shard.pt").unlink()
    assert checkpoint.verify(path) == "missing file(s) ['sub/shard.pt']"
    (path / checkpoint.MANIFEST).write_text('{"files": {"state.json"')  # torn manifest
    assert checkpoint.verify(path).startswith("unreadable manifest")
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.verify(path) == "no manifest (its write never finished)"


def test_older_checkpoints_are_deleted_once_a_newer_one_is_complete(tmp_path):
    fake_save(tmp_path, 2)
    fake_save(tmp_path, 4)
    (tmp_path / "step3").mkdir()  # an unfinished save older than the newest complete one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2", "step3", "step4"]
    # step 6's save is under way: nothing is deleted until it is complete
    unfinished = checkpoint.prepare(tmp_path, 6)
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert checkpoint.prune(tmp_path, 2) == [tmp_path / "step3"]
    assert checkpoint.kept(tmp_path) == [4, 2]
    fake_save(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step4", "step6"]
    fake_save(tmp_path, 8, keep=3)
    assert checkpoint.kept(tmp_path) == [8, 6, 4]
    fake_save(tmp_path, 10, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step10"]


def test_resume_passes_over_a_corrupt_checkpoint_and_names_it(tmp_path, capsys):
    ckpt_dir = tmp_path / checkpoint.CHECKPOINTS
    for step in (2, 4, 6):
        fake_save(ckpt_dir, step, keep=3)
    (ckpt_dir / "step6" / "sub" / "shard.pt").write_bytes(b"x" * 10)  # truncated
    (ckpt_dir / "step8").mkdir()  # a save killed before its manifest
    # the study's cheap check (sizes) already skips both
    assert checkpoint.checkpoint_state(tmp_path)["step"] == 4
    path, state = checkpoint.resume_point(ckpt_dir)
    assert (path.name, state) == ("step4", {"step": 4, "unique": [4]})
    err = capsys.readouterr().err
    assert f"{ckpt_dir / 'step6'}: checkpoint of step 6 is not usable: sub/shard.pt holds 10" in err
    assert f"{ckpt_dir / 'step8'}: checkpoint of step 8 is not usable: no manifest" in err
    assert checkpoint.kept(ckpt_dir) == [4, 2]  # the unusable ones are gone
    # a changed byte in step 4's manifest-listed state, and none is left: step 0
    (ckpt_dir / "step4" / "state.json").write_text('{"step": 5, "unique": [4]}')
    (ckpt_dir / "step2" / checkpoint.MANIFEST).write_text("not json")
    assert checkpoint.resume_point(ckpt_dir) is None
    assert "step4: checkpoint of step 4 is not usable: state.json fails its CRC-32" in (
        capsys.readouterr().err
    )
    assert checkpoint.checkpoint_state(tmp_path) is None


def test_a_run_written_before_manifests_still_resumes_from_its_latest_json(tmp_path):
    ckpt_dir = tmp_path / checkpoint.CHECKPOINTS
    (ckpt_dir / "step4").mkdir(parents=True)
    (ckpt_dir / checkpoint.LEGACY_LATEST).write_text(json.dumps({"step": 4, "unique": []}))
    assert checkpoint.checkpoint_state(tmp_path) == {"step": 4, "unique": []}
    assert checkpoint.resume_point(ckpt_dir)[0] == ckpt_dir / "step4"
    fake_save(ckpt_dir, 6)  # the first sealed checkpoint: latest.json no longer counts
    assert checkpoint.checkpoint_state(tmp_path)["step"] == 6


@pytest.mark.parametrize("keep", [0, -1])
def test_checkpoint_keep_below_one_is_refused(keep):
    with pytest.raises(ConfigError, match=r"key 'grpo.checkpoint_keep' expected a positive"):
        load_config(SMOKE, {"grpo.checkpoint_keep": keep})


def test_export_refuses_a_step_that_is_not_kept(tmp_path):
    fake_save(tmp_path / checkpoint.CHECKPOINTS, 4)
    with pytest.raises(checkpoint.CheckpointError, match=r"kept checkpoints \[4\], got 2"):
        checkpoint.export_run(tmp_path, step=2)
    with pytest.raises(checkpoint.CheckpointError, match=r"no complete checkpoint"):
        checkpoint.export_run(tmp_path / "nothing")


@pytest.mark.vllm
def test_a_real_run_keeps_two_exports_its_policy_and_resumes_past_a_corrupt_checkpoint(
    ray_session, tmp_path, capfd
):
    """A smoke run of 6 steps checkpointed every 2: step 2 goes once step 6 is complete; its
    final policy (run/hf) loads in transformers with the learner's last weights and in vLLM,
    whose greedy tokens are the learner's; with step 6 truncated, --resume names it, goes back
    to step 4 and writes the same rows, each once."""
    import torch
    from test_trainer import hf_logprobs, step_stats  # transformers with the learner's weights
    from transformers import AutoModelForCausalLM

    from rayrl.metrics import read_metrics
    from rayrl.pools import pool_shapes
    from rayrl.rollout.pool import RolloutPool
    from rayrl.trainer import HELD_OUT, Run, train
    from rayrl.trial import Trial

    cfg = load_config(SMOKE, {"output_dir": str(tmp_path), "grpo.data_budget": 48, "grpo.lr": 3e-3})
    trial = Trial(model="smoke-2", family="base", rollout_n=4, reuse_factor=1, seed=0)  # tied
    run_dir = tmp_path / "run"
    run = Run(cfg, trial, run_dir)
    try:
        run.run(progress=False)
        state = dict(run.learners.named_weights())
        prompts = run.eval_sets[HELD_OUT].prompts[:4]
        base_dir = run.model_dir
    finally:
        run.shutdown(keep=False)
    ckpt_dir = run_dir / checkpoint.CHECKPOINTS
    assert checkpoint.kept(ckpt_dir) == [6, 4]
    assert sorted(p.name for p in ckpt_dir.glob("step*")) == ["step4", "step6"]

    export = run_dir / checkpoint.HF_EXPORT
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    exported = model.state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    for name, w in state.items():
        torch.testing.assert_close(exported[name], w, atol=0, rtol=0)
    assert any(not torch.equal(base[n], w) for n, w in state.items())  # the run moved them
    # the dry-run's storage figure is what the kept checkpoints and the export take
    estimate = checkpoint.storage_bytes(model.num_parameters(), cfg.resources, keep=2)
    saved = sum(p.stat().st_size for p in ckpt_dir.glob("step*/*.pt"))
    assert 0.9 < saved / estimate["checkpoints"] < 1.25, (saved, estimate)
    exported_bytes = (export / "model.safetensors").stat().st_size
    assert 0.9 < exported_bytes / estimate["export"] < 1.25, (exported_bytes, estimate)

    # vLLM, the rollout engine the run used, started on the export alone
    pool = RolloutPool(str(export), **pool_shapes(cfg, trial.model, trial.family)["rollout"])
    try:
        outs = pool.greedy(prompts, max_tokens=8)
    finally:
        pool.shutdown()
    pairs = [(p, list(o.token_ids)) for p, o in zip(prompts, outs)]
    for out, (logp, argmax) in zip(outs, hf_logprobs(state, base_dir, pairs)):
        assert argmax.tolist() == list(out.token_ids)
        torch.testing.assert_close(torch.tensor(out.logprobs), logp, atol=1e-4, rtol=0)

    before = read_metrics(run_dir / "metrics.parquet")
    steps_before = step_stats(run_dir)
    shard = ckpt_dir / "step6" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # torn by a kill
    capfd.readouterr()
    train(cfg, trial, run_dir, resume=True, progress=False)
    log = "".join(capfd.readouterr())
    assert f"{ckpt_dir / 'step6'}: checkpoint of step 6 is not usable" in log
    assert "resumed from step 4" in log
    after = read_metrics(run_dir / "metrics.parquet")
    assert after["step"].tolist() == [0, 2, 4, 6]
    pd.testing.assert_frame_equal(after, before)  # steps 5 and 6 recomputed, each once
    assert [s["step"] for s in steps_before] == [1, 2, 3, 4, 5, 6]
    assert step_stats(run_dir) == steps_before
    assert checkpoint.kept(ckpt_dir) == [6, 4] and checkpoint.verify(ckpt_dir / "step6") is None


@pytest.mark.vllm
def test_rayrl_export_merges_zero3_shards_into_the_learners_weights(ray_session, tmp_path):
    """Two ZeRO-3 ranks each save a shard of the policy; `rayrl export` puts them together
    into the weights the learner group holds, as the run's own export does."""
    import torch
    from transformers import AutoModelForCausalLM

    from rayrl.cli import main
    from rayrl.trainer import Run
    from rayrl.trial import Trial

    shards = {"resources.learners": 2, "resources.zero_stage": 3, "grpo.lr": 3e-3}
    cfg = load_config(SMOKE, {"output_dir": str(tmp_path), "grpo.data_budget": 16, **shards})
    run = Run(cfg, Trial("smoke-1", "base", 4, 1, 0), tmp_path / "run")
    try:
        run.run(progress=False)
        state = dict(run.learners.named_weights())
    finally:
        run.shutdown(keep=False)
    ckpt = tmp_path / "run" / checkpoint.CHECKPOINTS / "step2"
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one shard per rank
    assert main(["export", str(tmp_path / "run"), "--step", "2", "--out", str(tmp_path / "x")]) == 0
    assert main(["export", str(tmp_path / "run"), "--step", "1"]) == 2  # not a kept step
    for out in (tmp_path / "x", tmp_path / "run" / checkpoint.HF_EXPORT):
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        for name, w in state.items():
            torch.testing.assert_close(exported[name], w, atol=0, rtol=0)


def test_the_dry_runs_storage_estimate_counts_the_kept_checkpoints():
    """A 72B ZeRO-3 checkpoint is about 1 TiB (deploy/storage.yaml): the qwen2.5-base grid
    keeping all 10 of its checkpoints a run would not fit the 20 TiB volume, keeping 2 does."""
    from rayrl.models.memory import architecture
    from rayrl.study.dryrun import storage_estimate

    def total_tib(keep: int) -> float:
        cfg = load_config(ROOT / "configs" / "qwen2.5-base.yaml", {"grpo.checkpoint_keep": keep})
        text = storage_estimate(cfg)
        assert text.startswith(f"storage (estimate, grpo.checkpoint_keep={keep}): ")
        line = next(x for x in text.splitlines() if "qwen2.5-72b" in x)
        assert f"3 run(s) x ({keep} checkpoints " in line
        head = text.splitlines()[0].split("): ")[1].split()
        assert head[1] == "TiB"
        return float(head[0])

    cfg = load_config(ROOT / "configs" / "qwen2.5-base.yaml")
    big = architecture(cfg, "qwen2.5-72b").params()
    one = checkpoint.storage_bytes(big, cfg.resources_for("qwen2.5-72b"), keep=1)
    assert 0.85 < one["checkpoints"] / 2**40 < 1.05 and one["export"] * 7 == one["checkpoints"]
    t1, t2, t3 = total_tib(1), total_tib(2), total_tib(3)
    # each kept checkpoint adds the same: 7/8 of a run's checkpoint-and-export
    assert t3 - t2 == pytest.approx(t2 - t1, rel=0.03)
    assert t2 - t1 == pytest.approx(t1 * 7 / 8, rel=0.03)
    assert t2 < 20 < 3 * 10 * one["checkpoints"] / 2**40  # keep 2 fits; 3 seeds x 10 do not
    # The bytes follow the engine's dtype, not the device: an fp32 GPU learner saves fp32
    # weights (4 + 8 + 4 bytes a parameter at ZeRO-3 against bf16's 2 + 8 + 4).
    fp32 = dataclasses.replace(cfg.resources_for("qwen2.5-72b"), learner_dtype="float32")
    assert fp32.device == "gpu" and not fp32.engine_bf16
    full = checkpoint.storage_bytes(big, fp32, keep=1)
    assert (
        full["checkpoints"] * 14 == one["checkpoints"] * 16 and full["export"] == 2 * one["export"]
    )


def test_a_run_with_export_final_off_leaves_a_pointer_not_an_export(tmp_path, capsys):
    """grpo.export_final false (a ZeRO-3 run too large for one process's fp32 weights): no
    RUN_DIR/hf is built, and the log says how to build it."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", {"grpo.export_final": False})
    assert cfg.grpo.export_final is False
    out = checkpoint.export_final(tmp_path, 6, "unused", trained=True, enabled=False)
    assert out is None and not (tmp_path / "hf").exists()
    assert f"rayrl export {tmp_path}" in capsys.readouterr().out
