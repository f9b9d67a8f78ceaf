"""Your own reward: `rewards.custom` routes rows by data_source glob to a function of yours.

A function is written "package.module:function" (imported as Python imports it: an installed
package, or PYTHONPATH) or "path/to/file.py:function" (relative to the config file's folder).
It is called as fn(response, ground_truth, row) -> float, where ground_truth is the row's
reward_model.ground_truth as stored and row the whole guru row. The first glob that matches
a row's data_source wins; rows that no glob matches keep rayrl's verifiers (dispatch.py).

A call runs the way rayrl's own verifiers do: in a killable worker process (isolate.py; the
function's module is imported once, in the zygote the workers fork from), under the
RewardPool's per-call timeout. A call that raises, times out or returns no finite number scores
0 and comes back as reason "error" or "timeout" with the error's text; RewardPool.score logs
them with their rows' indices and stops the run (CustomRewardError) when more than
rewards.max_failure_share of one function's calls in a batch failed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrl.rewards.verdict import Verdict

log = logging.getLogger(__name__)

MEMORY_MB = 4096  # address-space cap of a worker: room for numpy or sympy, not a runaway
ERROR_CHARS = 2000  # the tail of a traceback that travels back to the driver
FORMS = "'package.module:function' or 'path/to/file.py:function'"


class CustomRewardError(ValueError):
    """A user reward function failed on too many calls of one batch; the run stops."""


@dataclass(frozen=True)
class Rule:
    """One entry of rewards.custom, as the pool routes by it."""

    glob: str
    ref: str  # "package.module:function" or "/absolute/file.py:function"
    max_failure_share: float = 0.1


def split_ref(ref: str) -> tuple[str, str]:
    """(module or file, function name) of a reference; ValueError when it has neither form."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"expected {FORMS}, got {ref!r}")
    return target, name


def is_file_ref(ref: str) -> bool:
    return ref.rpartition(":")[0].endswith(".py")


def load_function(ref: str) -> Callable:
    """Import the function `ref` names; raises ImportError, AttributeError or TypeError."""
    target, name = split_ref(ref)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ImportError(f"no such file: {path}")
        module_name = "rayrl_custom_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            if str(path.parent) not in sys.path:  # its sibling modules import as in a script
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise AttributeError(f"{target} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise TypeError(f"{target}:{name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("response", "ground truth", {})
    except TypeError as e:
        raise TypeError(
            f"{target}:{name} cannot be called as fn(response, ground_truth, row): {e}"
        ) from None
    except ValueError:  # a builtin without a signature: take it on trust
        pass
    return fn


def problem(ref: Any) -> str | None:
    """Why `ref` is not a usable reward function (import, attribute, call form), or None."""
    if not isinstance(ref, str):
        return f"a string, got a {type(ref).__name__}"
    try:
        load_function(ref)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is the answer
        return f"{type(e).__name__}: {e}"
    return None


def reward_rules(rewards: Any) -> tuple[Rule, ...]:
    """The rules of a RewardsConfig (config.py), in its order."""
    return tuple(Rule(g, ref, rewards.max_failure_share) for g, ref in rewards.custom.items())


def route(rules: Sequence[Rule], data_source: str) -> Rule | None:
    """The first rule whose glob matches `data_source`, or None: rayrl's verifiers."""
    for rule in rules:
        if fnmatch.fnmatchcase(data_source, rule.glob):
            return rule
    return None


# --- inside the isolated worker ---------------------------------------------------------
_FUNCTIONS: dict[str, Callable] = {}


def _function(ref: str) -> Callable:
    fn = _FUNCTIONS.get(ref)
    if fn is None:
        fn = _FUNCTIONS[ref] = load_function(ref)
    return fn


def setup(refs: list[str]) -> None:
    """In the zygote: import each function once, so forked workers start with it loaded. A
    failure here is left for the call, which reports it as that call's error."""
    for ref in refs:
        try:
            _function(ref)
        except BaseException:  # noqa: BLE001, S110 - even sys.exit at import: call() reports it
            pass


def call(ref: str, response: str, ground_truth: Any, row: dict) -> tuple[str, Any]:
    """("ok", score) or ("raised", the error's traceback tail)."""
    try:
        value = _function(ref)(response, ground_truth, row)
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise TypeError(f"returned {value!r:.200}, expected a finite float")
        return ("ok", float(value))
    except BaseException as e:  # noqa: BLE001 - user code: every failure is a verdict
        return ("raised", "".join(traceback.format_exception(e))[-ERROR_CHARS:])


# --- in the reward actor ----------------------------------------------------------------
_ISOLATED: dict[str, Any] = {}


def score_custom(
    rule: Rule, response: str, ground_truth: Any, row: dict, timeout_s: float
) -> Verdict:
    """Score one response with the rule's function in its killable worker; never raises."""
    from rayrl.rewards.isolate import Isolated

    start = time.monotonic()
    try:
        iso = _ISOLATED.get(rule.ref)
        if iso is None:
            iso = _ISOLATED[rule.ref] = Isolated(__name__, MEMORY_MB, setup=[[rule.ref]])
            iso.warm()  # the import runs now, not under the first call's timeout
        status, value = iso.call("call", (rule.ref, response, ground_truth, row), timeout_s)
    except RuntimeError as e:  # no worker process could be started
        status, value = "error", str(e)
    seconds = time.monotonic() - start
    if status == "ok" and value[0] == "ok":
        score = value[1]
        return Verdict(score, "", "matched" if score > 0 else "wrong", seconds)
    if status == "timeout":
        return Verdict(0.0, None, "timeout", seconds, f"timed out after {timeout_s:g}s")
    detail = value[1] if status == "ok" else f"the worker process failed: {value}"
    return Verdict(0.0, None, "error", seconds, detail)


def loaded() -> list[str]:
    """The functions this process has scored with (score_custom)."""
    return list(_ISOLATED)


# --- on the driver ------------------------------------------------------------------------
def check_failures(items: Sequence[tuple], verdicts: Sequence[Verdict]) -> None:
    """Log each rule's failed calls of this batch with their rows' indices; raise
    CustomRewardError where they are over the rule's max_failure_share."""
    calls: dict[Rule, int] = {}
    failed: dict[Rule, list[tuple[Any, Verdict]]] = {}
    for item, v in zip(items, verdicts):
        if len(item) < 5:
            continue
        rule, row = item[4], item[3]
        calls[rule] = calls.get(rule, 0) + 1
        if v.reason in ("error", "timeout"):
            index = (row.get("extra_info") or {}).get("index", "?")
            failed.setdefault(rule, []).append((index, v))
    for rule, fails in failed.items():
        (first_index, first), kinds = fails[0], {}
        for _, v in fails:
            kinds[v.reason] = kinds.get(v.reason, 0) + 1
        what = ", ".join(
            f"{n} {'raised' if k == 'error' else 'timed out'}" for k, n in kinds.items()
        )
        indices = [i for i, _ in fails]
        summary = (
            f'rewards.custom["{rule.glob}"] ({rule.ref}): {len(fails)} of {calls[rule]} calls '
            f"in this batch failed ({what}) and scored 0; rows {indices[:20]}"
            f"{' ...' if len(indices) > 20 else ''}"
        )
        if len(fails) > rule.max_failure_share * calls[rule]:
            raise CustomRewardError(
                f"{summary}, over rewards.max_failure_share={rule.max_failure_share:g}; "
                f"row {first_index}: {first.error.strip()}"
            )
        last_line = first.error.strip().splitlines()[-1] if first.error.strip() else first.reason
        log.warning("%s; row %s: %s", summary, first_index, last_line)
