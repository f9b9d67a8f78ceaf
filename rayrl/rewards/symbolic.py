"""math-verify equivalence, run only inside an isolated worker (see isolate.py).

Imported once by the zygote, which also warms sympy and the LaTeX parser so that every forked
worker starts hot.
"""

from __future__ import annotations

import logging

from math_verify import parse, verify

# Timeouts are ours (the worker is killed); math-verify's own would use signal.alarm.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse(answer: str) -> list:
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def equivalent(gold: str, pred: str) -> bool:
    # A plain bool: a sympy object sent back would be rebuilt, and maybe evaluated, by the
    # unpickler in the parent, outside the timeout.
    return bool(verify(_parse(gold), _parse(pred), timeout_seconds=None))


equivalent("\\frac{1}{2}", "0.5")  # warm the parser and sympy before the zygote forks
