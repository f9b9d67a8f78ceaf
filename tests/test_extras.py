"""Extras that match the features: what a default study or a documented verb imports at run
time is installed by `pip install rayrl[cpu]`; MLflow and W&B by the `trackers` extra; a
tracker whose package is missing stops `rayrl study` before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rayrl import extras
from rayrl.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def installed_by(names: tuple[str, ...]) -> set[str]:
    """Every distribution `pip install rayrl[names]` installs: rayrl's requirements with
    those extras, and theirs, as the installed packages' metadata declare them."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [("rayrl", frozenset(names))]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in seen:
            continue
        seen.add((canonicalize_name(name), wanted))
        if name == "rayrl":  # read from the source, not a possibly stale egg-info
            reqs = list(PROJECT["dependencies"])
            reqs += [
                f"{r}; extra == '{e}'" for e in wanted for r in PROJECT["optional-dependencies"][e]
            ]
        else:
            try:
                reqs = metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue  # not for this platform
        for text in reqs:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return {n for n, _ in seen}


def listed(extra: str | None) -> set[str]:
    reqs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_each_feature_module_comes_from_its_package_listed_in_its_extra():
    providers = metadata.packages_distributions()
    needs = [n for group in extras.TRACKERS.values() for n in group]
    for need in [*needs, *extras.CONVERT, *extras.VIEWER]:
        where = "dependencies" if need.extra is None else f"extra {need.extra!r}"
        assert canonicalize_name(need.package) in listed(need.extra), f"{need} not in {where}"
        got = {canonicalize_name(d) for d in providers.get(need.module, [])}
        assert canonicalize_name(need.package) in got, f"{need.module} comes from {got}"
    # the default tracker, the viewer and the converter come with rayrl[cpu] itself
    for name in Config().study.trackers:
        assert all(n.extra is None for n in extras.TRACKERS[name]), name
    assert all(n.extra is None for n in (*extras.CONVERT, *extras.VIEWER))
    # and nothing a feature needs hides in the test extra any more
    assert not {canonicalize_name(n.package) for n in needs} & listed("test")


IMPORTS = """
import json, sys
from pathlib import Path
from rayrl.config import load_config
from rayrl.study.trackers import tracker_callbacks
before = set(sys.modules)
cfg = load_config(sys.argv[1])
for cb in tracker_callbacks(cfg, Path(sys.argv[2])):
    getattr(cb, "setup", lambda: None)()
import transformers.integrations.ggml  # rayrl models convert: transformers' GGUF reader
import gguf, accelerate
tops = {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
print(json.dumps({m: getattr(sys.modules[m], "__file__", None) for m in sorted(tops)}))
"""


@pytest.mark.parametrize(
    "config, names",
    [(ROOT / "configs" / "tiny.yaml", ("cpu",)), (SMOKE, ("cpu", "trackers"))],
    ids=["default-study", "smoke-with-mlflow"],
)
def test_every_module_a_study_imports_is_installed_by_the_extras_it_names(config, names, tmp_path):
    """The tiny study (trackers: the default) imports nothing outside rayrl[cpu]; the smoke
    study (mlflow too) nothing outside rayrl[cpu,trackers]."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(config), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout.splitlines()[-1])
    providers = metadata.packages_distributions()
    site = Path(sysconfig.get_paths()["purelib"])

    def owner(module: str, file: str | None) -> str:
        """The top-level package whose files hold the module: its own, or the one that
        vendors it (Ray's colorama in ray/thirdparty_files)."""
        path = Path(file) if file else None
        return path.relative_to(site).parts[0] if path and path.is_relative_to(site) else module

    allowed = installed_by(names)
    outside = {
        m: dists
        for m, file in modules.items()
        if (dists := {canonicalize_name(d) for d in providers.get(owner(m, file), [])})
        and not dists & allowed
        and "rayrl" not in dists
    }
    assert not outside, f"imported, but not installed by rayrl[{','.join(names)}]: {outside}"
    if "trackers" in names:  # the check can fail: mlflow is outside rayrl[cpu] alone
        assert "mlflow" in modules and "mlflow-skinny" not in installed_by(("cpu",))


def test_a_missing_tracker_package_stops_the_study_before_ray_starts(tmp_path, monkeypatch, capsys):
    import importlib.util

    import rayrl.cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    started = []
    monkeypatch.setattr(rayrl.cli, "_init_ray", lambda *a, **k: started.append(a))
    code = rayrl.cli.main(["study", str(SMOKE), "--out", str(tmp_path / "study")])
    err = capsys.readouterr().err
    assert code == 2 and not started
    assert f"{SMOKE}: key 'study.trackers' lists 'mlflow'" in err
    assert "pip install 'rayrl[trackers]'" in err and "Traceback" not in err
    assert not (tmp_path / "study").exists()
    # with its package there, the same check passes
    monkeypatch.setattr(importlib.util, "find_spec", real)
    extras.check_trackers(load_config(SMOKE))
