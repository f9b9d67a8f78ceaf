"""FitterActor: the named, detached Ray actor that trials stream metric rows to.

add_rows writes each batch to its own parquet part file (fsynced, atomically renamed)
before it returns, so a restart (max_restarts=-1) reloads every acknowledged row from
out_dir. Parts are compacted now and then into one file that names the last part it
holds; reloading takes the newest compact file plus the parts after it. Rows are keyed by
(run_id, step), last write wins, so a retried add_rows is harmless.

A background thread refits when rows arrive, at most once per min_interval_s, and writes
out_dir/fit.json in the format of `rayrl fit` (so `rayrl plan` reads it). Queries serve the
latest fit; the very first query after a (re)start fits at once if no fit exists yet.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray

from rayrl.scaling.commands import fit_table, write_json
from rayrl.scaling.fit import FitError, MainFit
from rayrl.scaling.planner import best_size, reuse_study
from rayrl.scaling.protocols import fit_run
from rayrl.scaling.table import REQUIRED, X_COLUMNS, MetricsError

log = logging.getLogger(__name__)

NAMESPACE = "rayrl"
KEY = ["run_id", "step"]
COMPACT_AFTER = 64  # part files before they are merged into one
PART = re.compile(r"(part|compact)-(\d+)\.parquet")


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Durable and atomic: a reader sees the whole file or none of it, even after a crash."""
    tmp = path.with_suffix(".tmp")
    df.to_parquet(tmp, index=False)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Fitter:
    """The actor's logic; FitterActor is this class under ray.remote."""

    def __init__(
        self, out_dir: str, x: str = "compute", min_interval_s: float = 5.0, n_boot: int = 200
    ):
        if x not in X_COLUMNS:
            raise ValueError(f"x must be one of {sorted(X_COLUMNS)}, got {x!r}")
        self.out_dir, self.x = Path(out_dir), x
        self.min_interval_s, self.n_boot = min_interval_s, n_boot
        self.parts_dir = self.out_dir / "rows"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards rows and the fit
        self._fit_lock = threading.Lock()  # one refit at a time
        self._rows, self._seq = self._load()
        self._doc: dict | None = None
        self._laws: dict[str, MainFit] = {}
        self._fitted_rows = 0
        self._last_fit = 0.0
        self._dirty = threading.Event()
        if len(self._rows):
            self._dirty.set()
        threading.Thread(target=self._refit_loop, daemon=True).start()

    def _load(self) -> tuple[pd.DataFrame, int]:
        files = sorted(
            (int(m.group(2)), m.group(1), f)
            for f in self.parts_dir.iterdir()
            if (m := PART.fullmatch(f.name))
        )
        compacts = [(seq, f) for seq, kind, f in files if kind == "compact"]
        since = compacts[-1][0] if compacts else 0
        keep = ([compacts[-1][1]] if compacts else []) + [
            f for seq, kind, f in files if kind == "part" and seq > since
        ]
        frames = [pd.read_parquet(f) for f in keep]
        rows = (
            pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(REQUIRED))
        )
        last_seq = max([since] + [seq for seq, _, _ in files])
        return rows.drop_duplicates(KEY, keep="last").reset_index(drop=True), last_seq

    def _compact(self) -> None:
        """Merge everything into compact-<seq>, then drop what it replaces (caller holds _lock)."""
        _write_parquet(self._rows, self.parts_dir / f"compact-{self._seq:08d}.parquet")
        for f in self.parts_dir.iterdir():
            m = PART.fullmatch(f.name)
            if m and int(m.group(2)) <= self._seq and f.name != f"compact-{self._seq:08d}.parquet":
                f.unlink()

    def add_rows(self, rows: list[dict]) -> int:
        """Persist a batch of metric rows, then acknowledge with the number of rows held."""
        batch = pd.DataFrame(rows)
        missing = [c for c in REQUIRED if c not in batch.columns]
        if missing:
            raise ValueError(f"add_rows: rows lack column(s) {missing} (DESIGN.md metric rows)")
        if batch.empty:
            return len(self._rows)
        with self._lock:
            self._seq += 1
            _write_parquet(batch, self.parts_dir / f"part-{self._seq:08d}.parquet")
            merged = pd.concat([self._rows, batch], ignore_index=True)
            self._rows = merged.drop_duplicates(KEY, keep="last").reset_index(drop=True)
            if sum(1 for f in self.parts_dir.glob("part-*.parquet")) >= COMPACT_AFTER:
                self._compact()
            n = len(self._rows)
        self._dirty.set()
        return n

    def _refit_loop(self) -> None:
        while True:
            self._dirty.wait()
            # Debounce: at most one refit per min_interval_s, however fast rows arrive.
            time.sleep(max(0.0, self._last_fit + self.min_interval_s - time.monotonic()))
            self._dirty.clear()
            try:
                self.refit()
            except Exception:  # noqa: BLE001 - a bad batch must not end refitting for good
                log.exception("fitter: refit failed; serving the previous fit")

    def refit(self) -> dict:
        """Fit now on every row held; returns summary()."""
        with self._fit_lock:
            with self._lock:
                rows = self._rows.copy()
            doc, laws = {"status": "empty", "warnings": [], "laws": {}}, {}
            if len(rows):
                try:
                    doc = fit_table(rows, self.x, n_boot=self.n_boot, source=str(self.parts_dir))[0]
                    laws = {axis: MainFit.from_dict(d) for axis, d in doc["laws"].items()}
                except (MetricsError, FitError) as e:
                    doc = {"status": "error", "error": str(e), "warnings": [], "laws": {}}
                write_json(doc, self.out_dir / "fit.json")
            with self._lock:
                self._doc, self._laws, self._fitted_rows = doc, laws, len(rows)
            self._last_fit = time.monotonic()
        return self.summary()

    def _current(self) -> tuple[dict, dict[str, MainFit]]:
        if self._doc is None:
            self.refit()
        with self._lock:
            return self._doc, self._laws

    def summary(self) -> dict:
        """Row counts, staleness and the latest fit (without bootstrap draws)."""
        doc, _ = self._current()
        with self._lock:
            n_rows = len(self._rows)
            n_runs = int(self._rows["run_id"].nunique()) if n_rows else 0
        laws = {
            a: {k: v for k, v in law.items() if k != "draws"}
            for a, law in doc.get("laws", {}).items()
        }
        return {
            **doc,
            "laws": laws,
            "n_rows": n_rows,
            "n_runs": n_runs,
            "fitted_rows": self._fitted_rows,
            "stale": self._fitted_rows != n_rows,
        }

    def predict(self, N: float, X: float) -> dict:
        """The law's L at (N, X) on the actor's axis, with its bootstrap interval."""
        _, laws = self._current()
        if self.x not in laws:
            return {"N": N, "X": X, "error": f"no {self.x}-axis law fitted yet"}
        try:
            return laws[self.x].predict(N, X)
        except FitError as e:
            return {"N": N, "X": X, "error": str(e)}

    def planner(
        self, compute_budget: float | None = None, data_budget: float | None = None
    ) -> dict:
        """Eq. 5 / eq. 7 answers for the budgets given, and eq. 9 when runs differ in reuse factor."""
        doc, laws = self._current()
        out: dict = {}
        for axis, budget in (("compute", compute_budget), ("data", data_budget)):
            if budget is not None:
                out[axis] = (
                    best_size(laws[axis], budget)
                    if axis in laws
                    else {"error": f"no {axis}-axis law"}
                )
        with self._lock:
            rows = self._rows.copy()
        if "reuse_factor" in rows.columns and rows["reuse_factor"].nunique() > 1:
            out["reuse"] = reuse_study(rows)
        return out

    def predict_final(self, run_id: str, x_end: float) -> dict | None:
        """A run's test loss at X = x_end from its points so far (intra-model), leaning on the
        cross-run k(N) fit as a prior; the interval is for the evaluation at x_end. "mean" and
        "test_loss" are the same number. None while no prediction is possible (the run has no
        usable rows yet, or too few and no cross-run law), as the trial scheduler expects."""
        _, laws = self._current()
        column = X_COLUMNS[self.x]
        with self._lock:
            run = self._rows[self._rows["run_id"].astype(str) == str(run_id)]
        if run.empty or column not in run.columns:
            return None
        run = run[pd.to_numeric(run["test_loss"], errors="coerce").between(0, 1, inclusive="right")]
        run = run[pd.to_numeric(run[column], errors="coerce") > 0].sort_values("step")
        if run.empty:
            return None
        N = float(run["n_params"].iloc[0])
        try:
            rf = fit_run(
                run[column].to_numpy(float), run["test_loss"].to_numpy(float), laws.get(self.x), N
            )
        except FitError:
            return None
        L, lo, hi = (float(v) for v in rf.predict(x_end))
        return {
            "run_id": run_id,
            "x_end": float(x_end),
            "n_points": len(run),
            "N": N,
            "mean": L,
            "test_loss": L,
            "lo": lo,
            "hi": hi,
            "k": rf.k,
            "k_source": rf.source,
        }

    def rows(self) -> list[dict]:
        """Every row held, as dicts (NaN where a batch lacked a column)."""
        with self._lock:
            return self._rows.replace({np.nan: None}).to_dict("records")


# max_task_retries: calls in flight when the actor dies run again after the restart; add_rows
# is idempotent by (run_id, step). num_cpus=0: the fitter never holds a CPU a trial needs.
FitterActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(Fitter)


def get_or_create_fitter(name: str, out_dir: str, x: str = "compute") -> ray.actor.ActorHandle:
    """The detached fitter called `name` in namespace "rayrl"; created on first use (an existing
    one keeps its own out_dir and x).

    "DEFAULT" scheduling keeps the fitter out of the caller's placement group: created from a
    Tune trial it would otherwise die with that trial's group and never restart."""
    return FitterActor.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy="DEFAULT",
    ).remote(str(out_dir), x)
