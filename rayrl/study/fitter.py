"""FitterActor: the Ray actor that a study's trials stream metric rows to.

One per study: named from the resolved study directory (fitter_name), so two studies with
the same study.name on one cluster never share one; started by the study's driver
(start_fitter, which replaces a leftover of a crashed driver, so a resumed study gets a
fresh actor that reloads its rows from disk) and stopped when the study ends (stop_fitter).

add_rows appends each batch to a log (one JSON line per row, fsynced) before it returns,
so a restart (max_restarts=-1) reloads every acknowledged row from out_dir. Once a log
holds as many rows as the table, the table is written to one compact parquet file named
by the last log it holds, and a new log starts: reloading takes the newest compact file
plus the logs after it. Rows are keyed by (run_id, step), last write wins, so a retried
add_rows is harmless; the key index lives in memory, so a call costs the same at any table
size (tools/bench_fitter.py).

A background thread refits when rows arrive, at most once per min_interval_s, and writes
out_dir/fit.json in the format of `rayrl fit` (so `rayrl plan` reads it). Queries serve the
latest fit; the very first query after a (re)start fits at once if no fit exists yet.
Fits, predictions and planner answers are per (axis, family): rows of two families never
share a law. forecast() answers a trial about its own run (send_row), and snapshot() hands
the scheduler every run's forecast in one call, so it can judge any run at any X without
asking again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from rayrl.metrics import (
    FORECAST,
    REQUIRED,
    LawKey,
    MetricsError,
    check_columns,
    law_groups,
    x_column,
)
from rayrl.scaling.document import fit_table, laws_of, without_draws, write_json
from rayrl.scaling.fit import FitError, MainFit
from rayrl.scaling.planner import best_size, reuse_study
from rayrl.scaling.protocols import RunFit, fit_run
from rayrl.storage import append_line, fsync_dir, replace_atomic

log = logging.getLogger(__name__)

NAMESPACE = "rayrl"
KEY = ["run_id", "step"]
COMPACT_AFTER = 4096  # rows logged, at the least, before the table is compacted
ROW_TIMEOUT_S = 60.0  # how long a trial waits for its forecast before reporting without one
# log-N.jsonl: rows as acknowledged; compact-N: the table through log N; part-N: older studies'.
PART = re.compile(r"(part|compact|log)-(\d+)\.(parquet|jsonl)")
Key = tuple[str, int]


def _key(row: dict) -> Key:
    return str(row["run_id"]), int(row["step"])


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value JSON can write."""
    return value.item() if hasattr(value, "item") else str(value)


def read_log(path: Path) -> list[dict]:
    """A log's rows; a torn last line (a kill during its write, never acknowledged) is left
    out."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("fitter: %s ends in a torn line (never acknowledged); left out", path)
    return rows


def held_on_disk(parts_dir: str | Path) -> tuple[list[dict], int]:
    """Every row the files in parts_dir hold (newest compact file, then the logs and parts
    after it, in order; later rows win by key), and the last sequence number used."""
    files = sorted(
        (int(m.group(2)), m.group(1), f)
        for f in Path(parts_dir).iterdir()
        if (m := PART.fullmatch(f.name))
    )
    compacts = [(seq, f) for seq, kind, f in files if kind == "compact"]
    since = compacts[-1][0] if compacts else 0
    rows: dict[Key, dict] = {}
    batches = [pd.read_parquet(compacts[-1][1]).to_dict("records")] if compacts else []
    for seq, kind, f in files:
        if seq > since and kind != "compact":
            batches.append(read_log(f) if kind == "log" else pd.read_parquet(f).to_dict("records"))
    for batch in batches:
        rows.update((_key(r), r) for r in batch)
    return list(rows.values()), max([since] + [seq for seq, _, _ in files])


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Durable and atomic: a reader sees the whole file or none of it, even after a crash;
    a full disk raises OutOfSpace naming the directory (rayrl/storage.py)."""
    replace_atomic(path, lambda tmp: df.to_parquet(tmp, index=False))


@dataclass
class Forecast:
    """One run's intra-model fit: its test loss at any X, with the interval of one evaluation."""

    run_id: str
    N: float
    n_points: int
    fit: RunFit

    def at(self, x_end: float) -> dict:
        """The prediction at X = x_end; "mean" and "test_loss" are the same number."""
        L, lo, hi = (float(v) for v in self.fit.predict(x_end))
        return {
            "run_id": self.run_id,
            "x_end": float(x_end),
            "n_points": self.n_points,
            "N": self.N,
            "mean": L,
            "test_loss": L,
            "lo": lo,
            "hi": hi,
            "k": self.fit.k,
            "k_source": self.fit.source,
        }

    def to_result(self) -> dict[str, Any]:
        """The forecast as flat result keys (FORECAST/<field>), for a trial's `tune.report`."""
        return {f"{FORECAST}/{k}": v for k, v in {"N": self.N, **asdict(self.fit)}.items()}

    @classmethod
    def from_result(cls, run_id: str, result: dict[str, Any]) -> Forecast | None:
        """The forecast a result carries (to_result), None when it carries none."""
        prefix = f"{FORECAST}/"
        fields = {k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)}
        if not fields:
            return None
        N = float(fields.pop("N"))
        fit = RunFit(**fields)
        return cls(run_id, N, fit.n, fit)


class Fitter:
    """The actor's logic; FitterActor is this class under ray.remote."""

    def __init__(
        self,
        out_dir: str,
        x: str = "compute",
        min_interval_s: float = 5.0,
        n_boot: int = 200,
        rollout_n: int | None = None,
    ):
        """rollout_n: the study's main group size, which picks the law's rows (table.law_rows)
        as the report does."""
        self.column = x_column(x)
        self.out_dir, self.x, self.rollout_n = Path(out_dir), x, rollout_n
        self.min_interval_s, self.n_boot = min_interval_s, n_boot
        self.parts_dir = self.out_dir / "rows"
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards rows and the fit
        self._fit_lock = threading.Lock()  # one refit at a time
        # Rows by key, and the same rows by run (forecast reads one run), built once per batch
        # from the batch alone; the table is made from them when a fit or a query needs it.
        self._by_key: dict[Key, dict] = {}
        self._by_run: dict[str, dict[int, dict]] = {}
        self._version, self._table = 0, (-1, pd.DataFrame())
        held, self._seq = held_on_disk(self.parts_dir)
        self._hold(held)
        self._logged = 0  # rows in the current log
        self._new_log()  # never append after a torn line
        self._doc: dict | None = None
        self._laws: dict[LawKey, MainFit] = {}
        self._fitted_rows = 0
        self._last_fit = 0.0
        self._fit_seconds = 0.0  # the last refit's
        self._dirty = threading.Event()
        if self._by_key:
            self._dirty.set()
        threading.Thread(target=self._refit_loop, daemon=True).start()

    def _hold(self, rows: list[dict]) -> None:
        """Take rows into the in-memory table, later ones winning by key (caller holds _lock
        or is __init__)."""
        for row in rows:
            run_id, step = key = _key(row)
            self._by_key[key] = row
            self._by_run.setdefault(run_id, {})[step] = row
        self._version += 1

    @property
    def _rows(self) -> pd.DataFrame:
        """Every row held, as one table, made again only after rows arrived."""
        with self._lock:
            version, table = self._table
            if version != self._version:
                rows = list(self._by_key.values())
                table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(REQUIRED))
                self._table = self._version, table
            return table

    def _new_log(self) -> None:
        """Start log-<seq+1>, its directory entry on disk before any row is acknowledged in
        it."""
        self._seq += 1
        self._log = self.parts_dir / f"log-{self._seq:08d}.jsonl"
        self._log.touch()
        fsync_dir(self.parts_dir)
        self._logged = 0

    def _compact(self) -> None:
        """Write the table through the current log as compact-<seq>, then drop the files it
        replaces and start a new log. Once a log holds as many rows as the table, so each
        row is rewritten a bounded number of times on average (caller holds _lock)."""
        rows = list(self._by_key.values())
        name = f"compact-{self._seq:08d}.parquet"
        _write_parquet(pd.DataFrame(rows), self.parts_dir / name)
        for f in self.parts_dir.iterdir():
            m = PART.fullmatch(f.name)
            if m and int(m.group(2)) <= self._seq and f.name != name:
                f.unlink()
        self._new_log()

    def add_rows(self, rows: list[dict]) -> int:
        """Persist a batch of metric rows, then acknowledge with the number of rows held."""
        if not rows:
            return len(self._by_key)
        check_columns(pd.DataFrame(rows), "add_rows")
        lines = "\n".join(json.dumps(r, default=_plain) for r in rows)
        with self._lock:
            append_line(self._log, lines)  # fsynced: acknowledged rows survive a kill
            self._hold([json.loads(line) for line in lines.splitlines()])
            self._logged += len(rows)
            if self._logged >= max(COMPACT_AFTER, len(self._by_key)):
                self._compact()
            n = len(self._by_key)
        self._dirty.set()
        return n

    def _refit_loop(self) -> None:
        while True:
            self._dirty.wait()
            # Debounce: at most one refit per min_interval_s, however fast rows arrive, and
            # refits at most a third of the time (a large table's fit holds the GIL that
            # add_rows needs).
            interval = max(self.min_interval_s, 2 * self._fit_seconds)
            time.sleep(max(0.0, self._last_fit + interval - time.monotonic()))
            self._dirty.clear()
            try:
                self.refit()
            except Exception:  # noqa: BLE001 - a bad batch must not end refitting for good
                log.exception("fitter: refit failed; serving the previous fit")

    def refit(self) -> dict:
        """Fit now on every row held; returns summary()."""
        with self._fit_lock:
            started = time.monotonic()
            rows = self._rows.copy()  # the fit may add columns
            doc, laws = {"status": "empty", "families": {}}, {}
            if len(rows):
                try:
                    doc = fit_table(
                        rows,
                        self.x,
                        n_boot=self.n_boot,
                        source=str(self.parts_dir),
                        rollout_n=self.rollout_n,
                    )[0]
                    laws = laws_of(doc)
                except (MetricsError, FitError) as e:
                    doc = {"status": "error", "error": str(e), "families": {}}
                write_json(doc, self.out_dir / "fit.json")
            with self._lock:
                self._doc, self._laws, self._fitted_rows = doc, laws, len(rows)
            self._fit_seconds = time.monotonic() - started
            self._last_fit = time.monotonic()
        return self.summary()

    def _current(self) -> tuple[dict, dict[LawKey, MainFit]]:
        if self._doc is None:
            self.refit()
        with self._lock:
            return self._doc, self._laws

    def summary(self) -> dict:
        """Row counts, staleness and the latest fit (without bootstrap draws)."""
        doc, _ = self._current()
        with self._lock:
            n_rows, n_runs = len(self._by_key), len(self._by_run)
        return {
            **without_draws(doc),
            "n_rows": n_rows,
            "n_runs": n_runs,
            "fitted_rows": self._fitted_rows,
            "stale": self._fitted_rows != n_rows,
        }

    def predict(self, N: float, X: float, family: str) -> dict:
        """The family's law's L at (N, X) on the actor's axis, with its bootstrap interval."""
        _, laws = self._current()
        key = LawKey(self.x, family)
        if key not in laws:
            return {"N": N, "X": X, "error": f"no {self.x}-axis law fitted for {family!r} yet"}
        try:
            return laws[key].predict(N, X)
        except FitError as e:
            return {"N": N, "X": X, "error": str(e)}

    def planner(
        self, family: str, compute_budget: float | None = None, data_budget: float | None = None
    ) -> dict:
        """Eq. 5 / eq. 7 answers for the family and budgets given, and eq. 9 when its runs
        differ in reuse factor."""
        _, laws = self._current()
        out: dict = {}
        for axis, budget in (("compute", compute_budget), ("data", data_budget)):
            if budget is not None:
                key = LawKey(axis, family)
                out[axis] = (
                    best_size(laws[key], budget)
                    if key in laws
                    else {"error": f"no {axis}-axis law for {family!r}"}
                )
        table = self._rows
        rows = table[law_groups(table) == family]
        if rows["reuse_factor"].nunique() > 1:
            out["reuse"] = reuse_study(rows)
        return out

    def _forecast(self, run: pd.DataFrame, laws: dict[LawKey, MainFit]) -> Forecast | None:
        """A run's forecast from its rows so far (intra-model), leaning on its family's
        cross-run k(N) fit as a prior. None while no prediction is possible (no usable rows
        yet, or too few and no cross-run law)."""
        run = run[pd.to_numeric(run["test_loss"], errors="coerce").between(0, 1, inclusive="right")]
        run = run[pd.to_numeric(run[self.column], errors="coerce") > 0].sort_values("step")
        if run.empty:
            return None
        N = float(run["n_params"].iloc[0])
        law = laws.get(LawKey(self.x, str(law_groups(run.iloc[:1]).iloc[0])))
        try:
            rf = fit_run(run[self.column].to_numpy(float), run["test_loss"].to_numpy(float), law, N)
        except FitError:
            return None
        return Forecast(str(run["run_id"].iloc[0]), N, len(run), rf)

    def forecast(self, run_id: str) -> Forecast | None:
        """A run's forecast from every row it has sent, None while it has none."""
        _, laws = self._current()
        with self._lock:
            run = list(self._by_run.get(str(run_id), {}).values())
        return self._forecast(pd.DataFrame(run), laws) if run else None

    def snapshot(self) -> dict[str, Forecast]:
        """Every run's forecast, by run id (runs without one are left out)."""
        _, laws = self._current()
        rows = self._rows
        out = {}
        for run_id, run in rows.groupby(rows["run_id"].astype(str)):
            forecast = self._forecast(run, laws)
            if forecast is not None:
                out[run_id] = forecast
        return out

    def rows(self) -> list[dict]:
        """Every row held, as dicts (NaN where a batch lacked a column)."""
        return self._rows.replace({np.nan: None}).to_dict("records")


# max_task_retries: calls in flight when the actor dies run again after the restart; add_rows
# is idempotent by (run_id, step). num_cpus=0: the fitter never holds a CPU a trial needs.
FitterActor = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(Fitter)


def send_row(
    fitter: ray.actor.ActorHandle, row: dict[str, Any], timeout_s: float = ROW_TIMEOUT_S
) -> Forecast | None:
    """Hand a trial's metric row to the study's fitter and wait for the run's forecast on
    every row so far (the trial reports it with the row: see ScalingLawScheduler). Calls
    from one caller run in order, so the forecast sees the row. A trial may wait here; a
    Tune callback never does. None when the fitter does not answer in time: the row stays in
    the run's metrics.parquet, and the study catches the fitter up from there."""
    fitter.add_rows.remote([row])
    try:
        return ray.get(fitter.forecast.remote(str(row["run_id"])), timeout=timeout_s)
    except ray.exceptions.RayError as e:
        log.warning("fitter: no forecast for %s (%s); reporting without one", row["run_id"], e)
        return None


def fitter_name(study_dir: str | Path) -> str:
    """The actor name of a study's fitter: from its resolved directory, never study.name
    alone, so studies that share a name on one cluster keep their own rows."""
    resolved = str(Path(study_dir).resolve())
    return f"fitter-{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def start_fitter(
    study_dir: str | Path, x: str = "compute", rollout_n: int | None = None
) -> ray.actor.ActorHandle:
    """A fresh fitter for the study at study_dir, reloading its rows from study_dir/fitter.

    A leftover one (a driver that crashed before stop_fitter) is replaced, so a resumed
    study runs today's code and settings. "DEFAULT" scheduling keeps the fitter out of the
    caller's placement group. Detached: the study's trials run in other workers and must
    find it; stop_fitter ends it."""
    name = fitter_name(study_dir)
    stop_fitter(study_dir)
    return FitterActor.options(
        name=name, namespace=NAMESPACE, lifetime="detached", scheduling_strategy="DEFAULT"
    ).remote(str(Path(study_dir).resolve() / "fitter"), x, rollout_n=rollout_n)


def get_fitter(study_dir: str | Path) -> ray.actor.ActorHandle:
    """The running fitter of the study at study_dir (raises ValueError when there is none)."""
    return ray.get_actor(fitter_name(study_dir), namespace=NAMESPACE)


def stop_fitter(study_dir: str | Path) -> bool:
    """End the study's fitter for good; False when none was running."""
    try:
        ray.kill(get_fitter(study_dir), no_restart=True)
    except ValueError:
        return False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the name is free once the actor is gone
        try:
            get_fitter(study_dir)
        except ValueError:
            return True
        time.sleep(0.1)
    raise TimeoutError(f"fitter {fitter_name(study_dir)} still alive 60 s after ray.kill")
