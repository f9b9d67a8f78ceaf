"""The FitterActor on real Ray: rows on disk before the ack, survival of a kill, served fits."""

import time
from pathlib import Path

import pandas as pd
import pytest

from rayrl.scaling.synthetic import make_metrics
from rayrl.study import fitter as fitter_module
from rayrl.study.fitter import (
    NAMESPACE,
    Fitter,
    Forecast,
    fitter_name,
    get_fitter,
    start_fitter,
    stop_fitter,
)


@pytest.fixture(scope="module")
def rows():
    return make_metrics(seed=41, points=30).to_dict("records")


FAMILY = "synthetic"  # make_metrics' family


def on_disk(out_dir) -> pd.DataFrame:
    return pd.DataFrame(fitter_module.held_on_disk(out_dir / "rows")[0])


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_rows_are_persisted_before_ack_and_survive_a_kill(ray_session, tmp_path, rows):
    ray = ray_session
    actor = start_fitter(tmp_path)
    rows_dir = tmp_path / "fitter"
    try:
        for i in range(0, len(rows), 90):
            held = ray.get(actor.add_rows.remote(rows[i : i + 90]))
            # The ack comes after the batch is on disk: every acknowledged row is readable now.
            assert (
                len(on_disk(rows_dir).drop_duplicates(["run_id", "step"]))
                == held
                == min(i + 90, len(rows))
            )
        assert ray.get(actor.add_rows.remote(rows[:90])) == len(
            rows
        )  # a retried batch adds nothing
        before = ray.get(actor.refit.remote())
        assert before["status"] == "ok" and not before["stale"] and before["n_runs"] == 21
        run_id = rows[-1]["run_id"]
        final = ray.get(actor.forecast.remote(run_id)).at(1e21)

        ray.kill(actor, no_restart=False)
        again = get_fitter(tmp_path)
        assert len(ray.get(again.rows.remote())) == len(rows)
        assert ray.get(again.forecast.remote(run_id)).at(1e21) == final
        law = ray.get(again.summary.remote())["families"][FAMILY]["laws"]["compute"]
        assert law["k_max"] == pytest.approx(before["families"][FAMILY]["laws"]["compute"]["k_max"])
        pred = ray.get(again.predict.remote(72e9, 1e21, FAMILY))
        assert pred["lo"] < pred["test_loss"] < pred["hi"]
        assert "no compute-axis law" in ray.get(again.predict.remote(72e9, 1e21, "other"))["error"]
        plan = ray.get(again.planner.remote(FAMILY, compute_budget=1e21, data_budget=2e5))
        assert plan["compute"]["best"]["N"] == 72e9 and plan["data"]["best"]["N"] == 72e9
        assert (rows_dir / "fit.json").is_file()
    finally:
        assert stop_fitter(tmp_path) and not stop_fitter(tmp_path)


def test_refits_in_the_background_and_answers_the_scheduler(ray_session, tmp_path, rows):
    ray = ray_session
    actor = start_fitter(tmp_path)
    try:
        assert ray.get(actor.summary.remote())["status"] == "empty"
        assert ray.get(actor.forecast.remote("nobody")) is None
        ray.get(actor.add_rows.remote(rows))
        assert wait_for(lambda: not ray.get(actor.summary.remote())["stale"])
        assert ray.get(actor.summary.remote())["fitted_rows"] == len(rows)
        first = rows[0]["run_id"]
        early = [r for r in rows if r["run_id"] == first][:2]
        ray.get(actor.add_rows.remote([{**r, "run_id": "newcomer"} for r in early]))
        forecast = ray.get(actor.forecast.remote("newcomer"))
        pred = forecast.at(1e19)
        assert (
            pred["k_source"] == "prior"
            and pred["lo"] < pred["mean"] == pred["test_loss"] < pred["hi"]
        )
        snap = ray.get(actor.snapshot.remote())
        assert set(snap) == {r["run_id"] for r in rows} | {"newcomer"}
        assert snap["newcomer"].at(1e19) == pred  # the scheduler's local answer is the fitter's
        # a trial reports its forecast as result keys; the scheduler reads back the same one
        assert Forecast.from_result("newcomer", forecast.to_result()).at(1e19) == pred
        assert Forecast.from_result("newcomer", {"test_loss": 0.5}) is None
        with pytest.raises(ray.exceptions.RayTaskError, match="missing column"):
            ray.get(actor.add_rows.remote([{"run_id": "x", "step": 1}]))
    finally:
        ray.kill(actor, no_restart=True)


def test_fitter_made_inside_a_trial_outlives_the_trials_placement_group(ray_session, tmp_path):
    ray = ray_session
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0.1)
    def trial(out: str) -> int:  # like a Tune trainable: its children default into its group
        return ray.get(start_fitter(out).summary.remote())["n_rows"]

    pg = placement_group([{"CPU": 0.5}])
    ray.get(pg.ready(), timeout=60)
    inside = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    assert ray.get(trial.options(scheduling_strategy=inside).remote(str(tmp_path))) == 0
    remove_placement_group(pg)
    actor = ray.get_actor(fitter_name(tmp_path), namespace=NAMESPACE)
    try:
        time.sleep(2)  # a fitter inside the group would be dead by now, and never come back
        assert ray.get(actor.summary.remote(), timeout=60)["status"] == "empty"
    finally:
        ray.kill(actor, no_restart=True)


def test_compaction_keeps_every_row_and_a_crash_midway_loses_none(tmp_path, rows, monkeypatch):
    monkeypatch.setattr(fitter_module, "COMPACT_AFTER", 3)
    f = Fitter(str(tmp_path), min_interval_s=3600)
    batches = [rows[i : i + 50] for i in range(0, 350, 50)]
    for b in batches:
        f.add_rows(b)
    names = sorted(p.name for p in (tmp_path / "rows").iterdir())
    assert names[0].startswith("compact-") and len(names) < len(batches)
    assert len(Fitter(str(tmp_path), min_interval_s=3600).rows()) == 350
    # A crash after writing a compact file but before deleting its parts: both are on disk.
    stale = tmp_path / "rows" / "part-00000001.parquet"
    pd.DataFrame(batches[0]).to_parquet(stale)
    reloaded = Fitter(str(tmp_path), min_interval_s=3600)
    assert len(reloaded.rows()) == 350 and reloaded.add_rows(rows[350:400]) == 400


def rows_seen(ray, studies: dict, name_of) -> dict:
    """Two studies sharing a study.name on one cluster, each streaming its own rows to the
    fitter it finds by name_of(study_dir); what each study's fitter holds afterwards."""
    original = fitter_module.fitter_name
    fitter_module.fitter_name = name_of
    try:
        for study_dir, rows in studies.items():
            start_fitter(study_dir)
            ray.get(get_fitter(study_dir).add_rows.remote(rows))
        return {d: {r["run_id"] for r in ray.get(get_fitter(d).rows.remote())} for d in studies}
    finally:
        for d in studies:
            stop_fitter(d)
        fitter_module.fitter_name = original


def test_two_studies_with_one_name_on_one_cluster_never_see_each_others_rows(
    ray_session, tmp_path, rows
):
    a, b = tmp_path / "a" / "smoke", tmp_path / "b" / "smoke"  # same study.name, two dirs
    studies = {
        a: [{**r, "run_id": f"a-{r['run_id']}"} for r in rows[:60]],
        b: [{**r, "run_id": f"b-{r['run_id']}"} for r in rows[60:120]],
    }
    want = {d: {r["run_id"] for r in rs} for d, rs in studies.items()}
    assert fitter_name(a) != fitter_name(b)
    assert rows_seen(ray_session, studies, fitter_name) == want
    # The old naming, study.name alone: study b's fitter took over a's, and a's rows are gone.
    assert rows_seen(ray_session, studies, lambda d: Path(d).name) != want
