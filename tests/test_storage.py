"""A full disk (ENOSPC) at a write: the error names the directory and says it is out of
space, and nothing already written or acknowledged is lost or left half-written."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle

import pandas as pd
import pytest

from rayrl import checkpoint
from rayrl.metrics import MetricsLog, append_jsonl, read_metrics
from rayrl.storage import OutOfSpace, is_out_of_space, writing
from rayrl.study.tuner import StopOnFullDisk

ROW = {
    "run_id": "r",
    "family": "base",
    "model": "m",
    "n_params": 10,
    "compute_flops": 1.0,
    "data_samples": 8,
    "unique_samples": 8,
    "rollout_n": 4,
    "reuse_factor": 1,
    "seed": 0,
    "test_loss": 0.5,
}


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_at_a_metrics_write_keeps_every_row_already_written(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.parquet")
    log.append({**ROW, "step": 0})
    log.append({**ROW, "step": 2})
    before = (tmp_path / "metrics.parquet").read_bytes()
    monkeypatch.setattr(pd.DataFrame, "to_parquet", enospc)
    with pytest.raises(OutOfSpace) as e:
        log.append({**ROW, "step": 4})
    assert str(e.value).startswith(f"{tmp_path}: out of space (No space left on device)")
    assert "writing metrics.parquet" in str(e.value) and e.value.errno == errno.ENOSPC
    with pytest.raises(OutOfSpace):
        log.truncate_after(0)
    monkeypatch.undo()
    # the file is the one before the failed write, whole; the row was never acknowledged
    assert (tmp_path / "metrics.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet"]  # no .tmp left
    assert [r["step"] for r in log.rows] == [0, 2]
    assert read_metrics(tmp_path / "metrics.parquet")["step"].tolist() == [0, 2]
    log.append({**ROW, "step": 4})  # with space again, the run goes on
    assert MetricsLog(tmp_path / "metrics.parquet").rows[-1]["step"] == 4


def test_a_full_disk_mid_line_leaves_no_part_of_it(tmp_path, monkeypatch):
    path = tmp_path / "steps.jsonl"
    append_jsonl(path, {"step": 1})
    real = os.write

    def half_then_full(fd, data):  # the disk fills halfway through the line
        if len(data) > 4:
            return real(fd, bytes(data[: len(data) // 2]))
        enospc()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutOfSpace, match=rf"^{tmp_path}: out of space .* writing steps.jsonl"):
        append_jsonl(path, {"step": 2, "loss": 0.123456})
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'
    append_jsonl(path, {"step": 2})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_a_full_disk_while_sealing_leaves_the_checkpoint_incomplete_and_the_older_kept(
    tmp_path, monkeypatch
):
    older = checkpoint.prepare(tmp_path, 2)
    older.mkdir()
    (older / "model.pt").write_bytes(b"w" * 100)
    checkpoint.seal(older, {"step": 2}, keep=1)
    path = checkpoint.prepare(tmp_path, 4)
    path.mkdir()
    (path / "model.pt").write_bytes(b"v" * 100)
    real = checkpoint.write_bytes_atomic

    def full_at_manifest(p, data):
        if p.name == checkpoint.MANIFEST:
            enospc()
        real(p, data)

    monkeypatch.setattr(checkpoint, "write_bytes_atomic", full_at_manifest)
    with pytest.raises(OutOfSpace, match=rf"^{path}: out of space"):
        checkpoint.seal(path, {"step": 4}, keep=1, files={"pending.pkl": pickle.dumps(1)})
    assert checkpoint.verify(path) == "no manifest (its write never finished)"
    assert checkpoint.kept(tmp_path) == [2] and checkpoint.verify(older) is None


def test_an_out_of_space_error_is_recognised_through_a_wrapper():
    class Wrapped(RuntimeError):  # as Ray and Tune pass on a remote error: its text
        pass

    inner = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert is_out_of_space(Wrapped(f"trial failed: {inner}"))
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(OutOfSpace, match=r"/ckpt: out of space"), writing("/ckpt", "step4"):
        raise Wrapped(f"RayTaskError(OSError): {inner}")
    trial = RuntimeError(f"1 trial(s) failed: OutOfSpace: {OutOfSpace('/s/runs/r', 'x')}")
    with pytest.raises(OutOfSpace, match=r"^/s/runs/r: out of space"), writing("/s"):
        raise trial  # the study's error names the trial's directory, the deeper one
    with pytest.raises(PermissionError), writing("/ckpt"):
        raise PermissionError(errno.EACCES, "Permission denied")
    e = pickle.loads(pickle.dumps(OutOfSpace("/d", "x")))
    assert isinstance(e, OutOfSpace) and str(e).startswith("/d: out of space")


def test_a_write_that_fails_on_a_nearly_full_disk_is_out_of_space(tmp_path, monkeypatch):
    """torch's checkpoint writer on a full disk: a RuntimeError with no errno."""
    import rayrl.storage

    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 523328")
    with pytest.raises(RuntimeError, match="unexpected pos"), writing(tmp_path):
        raise torn  # plenty of space here: the error is what it says
    monkeypatch.setattr(rayrl.storage, "NEARLY_FULL", 1 << 62)
    with pytest.raises(OutOfSpace, match=rf"^{tmp_path}: out of space"), writing(tmp_path):
        raise torn
    with pytest.raises(OutOfSpace), writing(tmp_path / "not" / "yet"):  # a parent's disk
        raise torn


def test_a_trials_full_disk_stops_the_study_at_once(ray_session, tmp_path):
    """Tune would retry the trial (max_failures=2) and then run the others, each filling the
    same disk: StopOnFullDisk stops all at the first failure for space, naming the dir."""
    from ray import tune

    from rayrl.study.tuner import Study

    ran = tmp_path / "ran"
    ran.mkdir()

    def trainable(params: dict) -> None:
        (ran / f"{params['i']}-{len(list(ran.iterdir()))}").touch()
        if params["i"] == 0:
            raise OutOfSpace(tmp_path / "runs" / "r0", "metrics.parquet")
        import time

        time.sleep(30)

    root = os.path.dirname(os.path.dirname(__file__))
    study = Study(f"{root}/configs/smoke.yaml", tmp_path, {"study.trackers": []})
    tuner = tune.Tuner(
        trainable,
        param_space={"i": tune.grid_search([0, 1, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=study.run_config(verbose=0),
    )
    # What Tune's controller logs reaches the terminal: no traceback for the failure for
    # space, which rayrl reports in one line.
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    controller = logging.getLogger(StopOnFullDisk.TUNE_LOGGERS[0])
    controller.addHandler(handler)
    try:
        tuner.fit()
    finally:
        controller.removeHandler(handler)
    assert sorted(p.name for p in ran.iterdir()) == ["0-0"]  # no retry, no other trial
    assert str(study.full_disk.error).startswith(f"{tmp_path}/runs/r0: out of space")
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]
    assert study.full_disk.filter not in controller.filters  # only while the study runs


def test_only_failures_for_space_lose_tunes_traceback():
    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord("t", logging.ERROR, "f", 1, "failed", (), (type(exc), exc, None))

    assert not StopOnFullDisk.filter(record(OSError(errno.ENOSPC, "No space left on device")))
    assert StopOnFullDisk.filter(record(ValueError("a bug")))
    assert StopOnFullDisk.filter(logging.LogRecord("t", logging.INFO, "f", 1, "ok", (), None))


def test_a_kill_during_a_fitter_log_write_loses_no_acknowledged_row(tmp_path):
    """The fitter's log: a torn last line (never acknowledged) is left out on reload, the
    rows before it are all held, and the reloaded fitter writes a new log after it."""
    from rayrl.study.fitter import Fitter, held_on_disk

    f = Fitter(str(tmp_path), min_interval_s=3600)
    assert f.add_rows([{**ROW, "step": s} for s in (0, 2)]) == 2
    assert f.add_rows([{**ROW, "step": 2, "test_loss": 0.4}]) == 2  # last write wins
    (log,) = (tmp_path / "rows").glob("log-*.jsonl")
    with open(log, "a") as out:
        out.write('{"run_id": "r", "step": 4, "test_lo')  # the kill
    again = Fitter(str(tmp_path), min_interval_s=3600)
    assert sorted((r["step"], r["test_loss"]) for r in again.rows()) == [(0, 0.5), (2, 0.4)]
    assert again.add_rows([{**ROW, "step": 4}]) == 3
    assert len(held_on_disk(tmp_path / "rows")[0]) == 3
    assert len(list((tmp_path / "rows").glob("log-*.jsonl"))) == 2
