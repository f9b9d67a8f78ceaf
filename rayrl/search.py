"""A study's search space: dotted config keys mapped to a grid or to one Tune sampler, and
the variants it expands to.

    study:
      search:
        grpo.clip_high: [0.2, 0.28]                 # a grid: every value
        grpo.lr: {loguniform: [5.0e-5, 5.0e-4]}     # a sampler: num_samples draws
      num_samples: 2

Variants are drawn here, before Ray starts, from a seed the study fixes, so they can be
checked against the config's own validation and a resumed study draws the same ones. Each
variant is a set of overrides; every trial of the study's axes runs each variant.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Any

import numpy as np

from rayrl.metrics import DEFAULT_VARIANT as DEFAULT  # the variant without overrides

# name -> how many arguments and what they mean
SAMPLERS = {
    "grid_search": "a list of values, every one run",
    "choice": "a list of values, one drawn per sample",
    "uniform": "[lo, hi], a float drawn uniformly",
    "loguniform": "[lo, hi] with 0 < lo, a float drawn uniformly in log",
    "randint": "[lo, hi], an integer in lo..hi-1",
}


class SearchError(ValueError):
    """A search space that cannot be expanded: names the key and what was expected."""


def parse(key: str, spec: Any) -> tuple[str, list[Any]]:
    """(kind, arguments) of one key's spec: a list is a grid, a one-key mapping a sampler."""
    if isinstance(spec, list):
        spec = {"grid_search": spec}
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise SearchError(
            f"key '{key}' expected a list of values or one sampler "
            f"({', '.join(SAMPLERS)}) as {{name: arguments}}, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in SAMPLERS:
        raise SearchError(f"key '{key}' has an unknown sampler {kind!r} (one of {list(SAMPLERS)})")
    if not isinstance(args, list) or not args:
        raise SearchError(f"key '{key}': {kind} expected {SAMPLERS[kind]}, got {args!r}")
    if kind in ("uniform", "loguniform", "randint"):
        args = [_yaml_float(a) for a in args]
        if len(args) != 2 or not all(_number(a) for a in args):
            raise SearchError(f"key '{key}': {kind} expected {SAMPLERS[kind]}, got {args!r}")
        lo, hi = (float(a) for a in args)
        if not lo < hi:
            raise SearchError(f"key '{key}': {kind} expected lo < hi, got lo={lo:g}, hi={hi:g}")
        if kind == "loguniform" and lo <= 0:
            raise SearchError(f"key '{key}': loguniform needs 0 < lo (a log range), got lo={lo:g}")
        if kind == "randint" and not all(float(a).is_integer() for a in args):
            raise SearchError(f"key '{key}': randint expected integer bounds, got {args!r}")
    return kind, args


def _yaml_float(v: Any) -> Any:
    """YAML reads 5e-05 (no dot) as a string; a bound means the number."""
    try:
        return float(v) if isinstance(v, str) else v
    except ValueError:
        return v


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def points(key: str, spec: Any) -> list[Any]:
    """Every value, or both ends of a range, that the config must accept (checked before any
    actor starts)."""
    kind, args = parse(key, spec)
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    if kind in ("uniform", "loguniform"):
        return [float(a) for a in args]
    return list(args)


def variants(search: dict[str, Any], num_samples: int, seed: int) -> list[dict[str, Any]]:
    """The overrides of each variant: every grid point crossed with num_samples draws of the
    sampled keys (one draw when nothing is sampled). The draws depend on the search space
    and seed alone, so every sweep with the same space, and every resume, gets the same."""
    if not search:
        return [{}]
    specs = {k: parse(k, search[k]) for k in sorted(search)}
    grid = {k: args for k, (kind, args) in specs.items() if kind == "grid_search"}
    sampled = {k: (kind, args) for k, (kind, args) in specs.items() if kind != "grid_search"}
    # Seeded by the parsed space (YAML reads 5e-05 as a string, 5.0e-5 as a float: one range).
    digest = hashlib.sha256(json.dumps([specs, seed], sort_keys=True).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    draws = [
        {k: _draw(rng, kind, args) for k, (kind, args) in sampled.items()}
        for _ in range(num_samples if sampled else 1)
    ]
    out = []
    for values in itertools.product(*grid.values()):
        for draw in draws:
            out.append(dict(sorted({**dict(zip(grid, values)), **draw}.items())))
    return out


def _draw(rng: np.random.Generator, kind: str, args: list[Any]) -> Any:
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    lo, hi = float(args[0]), float(args[1])
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "loguniform":
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return int(rng.integers(int(lo), int(hi)))  # randint: lo..hi-1


def label(overrides: dict[str, Any]) -> str:
    """A variant's readable name, e.g. grpo.clip_high=0.28,grpo.lr=0.00016; 'default' for
    none. Floats keep 4 significant digits."""
    if not overrides:
        return DEFAULT
    return ",".join(f"{k}={_fmt(v)}" for k, v in sorted(overrides.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)
