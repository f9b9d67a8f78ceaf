"""study.trackers through Ray Tune's logger callbacks, read back with the trackers' own
libraries: TensorBoard event files, the MLflow file store, W&B offline runs. And the
study's Tuner on resume: the trials that remain, under today's scheduler and limit."""

import json
import os
import struct
import time
from pathlib import Path

import pytest
from ray import tune

from rayrl.config import load_config
from rayrl.metrics import EVAL, STEP, TRACKER_STEP, trial_result
from rayrl.study.fitter import start_fitter, stop_fitter
from rayrl.study.resume import remaining_trials
from rayrl.study.scheduler import ScalingLawScheduler
from rayrl.study.trackers import mlflow_uri, tracker_callbacks, wandb_dir, wandb_mode
from rayrl.study.tuner import Study, make_tuner

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def fake_trial(params, marker, fail_first):
    """Reports as rayrl.study.run_trial does: a step result per step, an eval row every 2."""
    t = params["trial"]
    run_id = f"{t['model']}-{t['family']}-n{t['rollout_n']}"
    common = {"run_id": run_id, "total_steps": STEPS, "sweeps": ",".join(t["sweeps"])}
    marker = Path(marker)
    if fail_first:  # every attempt of this run fails (Tune retries), so it can be resumed
        raise RuntimeError("the first run fails, so the study can be resumed")
    with open(marker / "spans.jsonl", "a") as f:
        f.write(json.dumps({"run_id": run_id, "start": time.time()}) + "\n")
    for step in range(1, STEPS + 1):
        tune.report(trial_result(STEP, {"step": step, "reward_mean": 0.1 * step}, common))
        if step % 2 == 0:
            row = {"step": step, "test_loss": 1.0 / step, "compute_flops": 1e9 * step}
            tune.report(trial_result(EVAL, row, common, n_params=100))
        time.sleep(0.5)
    with open(marker / "spans.jsonl", "a") as f:
        f.write(json.dumps({"run_id": run_id, "end": time.time()}) + "\n")


# Two trials, one per family: what the trackers must keep apart.
TWO = {"study.models": ["smoke-1"], "study.sweeps": [{"name": "size"}]}


def study_cfg(tmp_path, **overrides):
    return load_config(
        ROOT / "configs" / "smoke.yaml",
        {"study.name": "trk", "output_dir": str(tmp_path), **TWO, **overrides},
    )


class FakeStudy(Study):
    """The study's Tuner, trackers and fitter, around fake_trial and a scheduler of its own."""

    def __init__(self, cfg, study_dir, marker, fail_first, enabled):
        super().__init__(cfg, study_dir)
        self.marker, self.fail_first, self.enabled = marker, fail_first, enabled

    def trainable(self):
        return tune.with_resources(
            tune.with_parameters(fake_trial, marker=str(self.marker), fail_first=self.fail_first),
            {"cpu": 0.1},
        )

    def scheduler(self):
        log = str(self.dir / f"sched-{self.enabled}.jsonl")
        return ScalingLawScheduler(self.fitter, enabled=self.enabled, log_path=log)


def run(cfg, study_dir, marker, fail_first=False, enabled=True):
    study = FakeStudy(cfg, study_dir, marker, fail_first, enabled)
    study.fitter = start_fitter(study_dir)
    try:
        return make_tuner(cfg, study).fit()
    finally:
        stop_fitter(study_dir)


@pytest.fixture(scope="module")
def tracked(ray_session, tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("trk")
    monkeypatch_module.delenv("WANDB_API_KEY", raising=False)
    monkeypatch_module.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    cfg = study_cfg(tmp, **{"study.trackers": ["tensorboard", "mlflow", "wandb"]})
    marker = tmp / "marker"
    marker.mkdir()
    results = run(cfg, tmp, marker)
    assert not results.errors, results.errors
    return cfg, tmp


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tensorboard_event_files_hold_step_and_eval_rows(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, study_dir = tracked
    events = sorted((study_dir / "tune" / "trk").glob("*/events.out.tfevents.*"))
    assert len(events) == len(cfg.trials())
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        reward = [(e.step, e.value) for e in acc.Scalars("ray/tune/reward_mean")]
        assert [s for s, _ in reward] == list(range(1, STEPS + 1))  # x-axis: optimizer step
        loss = [(e.step, e.value) for e in acc.Scalars("ray/tune/test_loss")]
        assert loss == [(2, pytest.approx(0.5)), (4, pytest.approx(0.25))]
        assert "ray/tune/compute_flops" in tags
        # the trial's config as hyperparameters (TensorBoard's HParams plugin)
        assert "_hparams_/experiment" in acc.summary_metadata


def test_mlflow_file_store_holds_every_trial_with_its_config(tracked):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file-store opt-in

    cfg, study_dir = tracked
    assert mlflow_uri(cfg, study_dir) == (study_dir / "mlflow").resolve().as_uri()
    client = MlflowClient(tracking_uri=mlflow_uri(cfg, study_dir))
    exp = client.get_experiment_by_name("trk")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(cfg.trials())
    seen = set()
    for r in runs:
        params = r.data.params
        seen.add((params["trial/model"], params["trial/family"], params["trial/rollout_n"]))
        history = client.get_metric_history(r.info.run_id, "reward_mean")
        assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "test_loss")) == [
            2,
            4,
        ]
    assert seen == {(t.model, t.family, str(t.rollout_n)) for t in cfg.trials()}


def wandb_records(path: Path):
    """The records of a W&B run file, decoded with wandb's own protobuf Record. The file
    is a LevelDB-style log (wandb-core writes it; the Python reader left the SDK): after
    a 7-byte file header, 32 KiB blocks of chunks, each with a 7-byte header (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is
    padding."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_runs_offline_without_an_api_key(tracked):
    """One offline run per trial, in STUDY_DIR/wandb, holding the trial's config and every
    step and evaluation row, read back from the run file."""
    cfg, study_dir = tracked
    assert wandb_mode() == "offline"
    offline = sorted(wandb_dir(study_dir).glob("wandb/offline-run-*"))
    assert len(offline) == len(cfg.trials())
    seen = set()
    for run_dir in offline:
        (log,) = run_dir.glob("*.wandb")
        rows, config = [], {}
        for record in wandb_records(log):
            if record.HasField("history"):
                items = record.history.item  # a name is in key or, split at dots, nested_key
                rows.append(
                    {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
            elif record.HasField("config"):
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        trial = config["trial"]
        seen.add((trial["model"], trial["family"], trial["rollout_n"]))
        reward = [r[TRACKER_STEP] for r in rows if "reward_mean" in r]
        assert reward == list(range(1, STEPS + 1))  # the optimizer step, in its own column
        loss = [(r[TRACKER_STEP], r["test_loss"]) for r in rows if "test_loss" in r]
        assert loss == [(2, pytest.approx(0.5)), (4, pytest.approx(0.25))]
    assert seen == {(t.model, t.family, t.rollout_n) for t in cfg.trials()}


def test_a_tracker_left_out_is_off_and_mlflow_takes_a_tracking_uri(
    ray_session, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # as run_study sets it
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # a file URI opts in too
    cfg = study_cfg(
        tmp_path,
        **{
            "study.trackers": ["mlflow"],
            "study.mlflow_tracking_uri": (tmp_path / "elsewhere").as_uri(),
        },
    )
    marker = tmp_path / "marker"
    marker.mkdir()
    assert [type(c).__name__ for c in tracker_callbacks(cfg, tmp_path)] == [
        "CSVLoggerCallback",
        "JsonLoggerCallback",
        "MLflowLoggerCallback",
    ]
    assert not run(cfg, tmp_path, marker).errors
    assert not list((tmp_path / "tune").rglob("events.out.tfevents.*"))  # TensorBoard off
    assert not (tmp_path / "mlflow").exists() and (tmp_path / "elsewhere").is_dir()
    default = load_config(ROOT / "configs" / "tiny.yaml")  # sets no trackers: the default
    assert default.study.trackers == ["tensorboard"]
    assert [type(c).__name__ for c in tracker_callbacks(default, tmp_path)][
        -1
    ] == "TBXLoggerCallback"


def most_at_once(spans: list[dict]) -> int:
    """The most trials that were running at one time, from their start and end marks."""
    edges = sorted((s.get("start", s.get("end")), 1 if "start" in s else -1) for s in spans)
    running = peak = 0
    for _, delta in edges:
        running += delta
        peak = max(peak, running)
    return peak


def test_resume_takes_todays_scheduler_and_concurrency_limit(ray_session, tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    four = {"study.models": ["smoke-1", "smoke-2"]}  # 2 models x 2 families
    cfg = study_cfg(tmp_path, **{"study.max_concurrent": 4, **four})
    n = len(cfg.trials())
    first = run(cfg, tmp_path, marker, True)
    assert n == 4 and len(first.errors) == n  # every trial failed: the study is left to resume
    assert not (tmp_path / "sched-False.jsonl").exists()
    today = study_cfg(tmp_path, **{"study.max_concurrent": 2, **four})
    again = run(today, tmp_path, marker, enabled=False)
    assert not again.errors
    # today's scheduler (enabled=False, its own log) judged the resumed trials
    assert (tmp_path / "sched-False.jsonl").read_text().count('"action"') >= n
    spans = [json.loads(x) for x in (marker / "spans.jsonl").read_text().splitlines()]
    assert sum("end" in s for s in spans) == n
    # today's limit, not the first run's 4 (Tuner.restore restarted every errored trial at
    # once, whatever the limit: ray-project/ray#40652)
    assert most_at_once(spans) == 2


def test_a_resumed_study_runs_what_is_neither_finished_nor_stopped(tmp_path):
    cfg = study_cfg(tmp_path, **{"study.models": ["smoke-1", "smoke-2"]})  # 4 trials
    total = cfg.grpo.data_budget // cfg.grpo.prompts_per_step
    ids = [t.run_id for t in cfg.trials()]
    assert remaining_trials(cfg, tmp_path) == cfg.trials()  # nothing has run yet
    for run_id, step in zip(ids, (total, total - 2, 0)):  # the fourth never started
        (tmp_path / "runs" / run_id / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / run_id / "checkpoints" / "latest.json").write_text(
            json.dumps({"step": step})
        )
    left = [t.run_id for t in remaining_trials(cfg, tmp_path)]
    assert left == ids[1:]
    # the scheduler stopped the second one; a decision to continue stops nothing
    decisions = [{"run_id": ids[1], "action": "stop"}, {"run_id": ids[2], "action": "continue"}]
    (tmp_path / "scheduler.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    left = [t.run_id for t in remaining_trials(cfg, tmp_path)]
    assert left == ids[2:]
