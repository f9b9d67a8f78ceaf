"""The study side: the Tune search over runs (tuner), the fitter actor the runs stream rows
to (fitter), the law scheduler that prunes by it (scheduler), the trackers, the dry-run and
the report. `rayrl.scaling` below it holds the law maths and the fit document only.

Public names load lazily, so importing one module of the package (the report, say) does
not start importing Ray Tune.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = {
    "Study": "rayrl.study.tuner",
    "run_study": "rayrl.study.tuner",
    "run_trial": "rayrl.study.tuner",
    "trial_resources": "rayrl.study.tuner",
    "run_cpus": "rayrl.study.tuner",
    "run_bundles": "rayrl.study.tuner",
    "write_report": "rayrl.study.report",
    "dry_run": "rayrl.study.dryrun",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'rayrl.study' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


__all__ = sorted(_PUBLIC)
