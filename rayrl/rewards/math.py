"""Math verifier: last box, normalize, cheap in-process checks, then math-verify in an isolated process.

The cheap path decides most responses (equal normalized strings, or two plain numbers) in
microseconds; only answers it cannot decide pay for sympy, under a hard timeout.
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction
from functools import lru_cache

from rayrl.rewards.extract import final_text, last_boxed
from rayrl.rewards.isolate import Isolated
from rayrl.rewards.numeric import differ, values
from rayrl.rewards.verdict import Verdict

MAX_ANSWER_CHARS = 1000  # longer "answers" are not answers; never hand them to sympy

_UNITS = (
    "degrees|degree|cm|km|mm|meters|meter|inches|inch|feet|foot|ft|miles|mile|units|unit|"
    "sq|square|cents|cent|dollars|dollar|hours|hour|minutes|minute|seconds|second|days|day|"
    "years|year|kg|grams|gram|pounds|pound|mph|km/h|m/s|liters|liter|people|students|ways"
)  # no one-letter units: `2m` is more often 2 times m
# `\\frac` in some guru rows: a doubled escape. Not the tail of a longer run: in `\\\end` the
# first two backslashes are a matrix row break.
_DOUBLED = re.compile(r"(?<!\\)\\\\(?=[A-Za-z{}%$])")
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)(?![A-Za-z])")
_TEXT = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_TAIL = re.compile(
    rf"(?<=[\d}}])(?:\s*(?:\^?\{{?\\?circ\}}?)?\s*(?:{_UNITS})(?:\^?\{{?[23]\}}?)?)+\.?$"
)
_SPACING = re.compile(r"\\[,;:! ]|~|\s+")
# drop spacing, except one space that ends a command name before a letter: `\pi r` is not `\pir`
_SPACE = re.compile(r"(\\[A-Za-z]+) (?=[A-Za-z])|\s")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)|\\frac\{([^{}]*)\}(\d)|\\frac(\d)\{")
_SQRT_SHORT = re.compile(r"\\sqrt(\d+)")
_LHS = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)")
# As math-verify: a whole answer like 32,349, 14{,}916 or 32,\! 349 is one number; a comma
# followed by a space separates a list, so 32, 349 is two numbers. normalize() decides it before
# it drops the spacing that tells the two apart; after that every comma is a list's.
_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:,|\{,\})(?:\\!\s*)?\d{3})+(?:\.\d+)?(?:\\?%)?", re.ASCII)
_NUMBER = re.compile(r"(-?)(\d+)?(?:\.(\d+))?", re.ASCII)
_NUM_FRAC = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}|(-?)(\d+)/(\d+)", re.ASCII)


def _frac_short(m: re.Match) -> str:
    if m.group(1):
        return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if m.group(3) is not None:
        return f"\\frac{{{m.group(3)}}}{{{m.group(4)}}}"
    return f"\\frac{{{m.group(5)}}}{{"


def clean(answer: str) -> str:
    """Light cleanup that keeps the LaTeX parseable (what math-verify gets)."""
    s = _DOUBLED.sub(r"\\", answer.strip())
    boxed = last_boxed(s) if "\\boxed" in s or "\\fbox" in s else None
    s = boxed if boxed is not None else s
    for delim in ("\\(", "\\)", "\\[", "\\]", "\\$", "$"):
        s = s.replace(delim, "")
    return s.strip().rstrip(".").strip()


def normalize(answer: str) -> str:
    """Canonical string: no spacing, sizing, units, degree signs or text wrappers."""
    s = clean(answer)
    s = _TEXT.sub(r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\displaystyle", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _UNIT_TAIL.sub("", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s).strip()
    if _THOUSANDS.fullmatch(s):
        s = re.sub(r"\{,\}|,|\\!", "", s)
    s = _SPACE.sub(lambda m: f"{m.group(1)} " if m.group(1) else "", _SPACING.sub(" ", s))
    s = _FRAC_SHORT.sub(_frac_short, s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    return s.rstrip(".")


_normalize_gold = lru_cache(maxsize=16384)(normalize)  # ground truths repeat across a GRPO group


def _number(s: str) -> tuple[Fraction, bool, bool] | None:
    """(value, is_decimal, is_percent) for a plain number, None for anything else."""
    pct = s.endswith("%")
    s = s.removesuffix("\\%").removesuffix("%")
    if len(s) > 64:
        return None
    m = _NUMBER.fullmatch(s)
    if m and (m.group(2) or m.group(3)):
        whole = m.group(2) or "0"
        frac = m.group(3) or ""
        value = Fraction(int(whole + frac), 10 ** len(frac))
        return (-value if m.group(1) else value), bool(m.group(3)), pct
    m = _NUM_FRAC.fullmatch(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else m.group(4, 5, 6)
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return (-value if sign else value), False, pct
    return None


def _numbers_equal(a: tuple[Fraction, bool, bool], b: tuple[Fraction, bool, bool]) -> bool:
    # As math-verify: exact for integers and fractions, 6 decimals once either side is a decimal.
    # A percent matches both its number and its number / 100.
    decimal = a[1] or b[1]
    for x in (a[0], a[0] / 100) if a[2] else (a[0],):
        for y in (b[0], b[0] / 100) if b[2] else (b[0],):
            if (round(x, 6) == round(y, 6)) if decimal else x == y:
                return True
    return False


def _number_list(s: str) -> list[tuple[Fraction, bool, bool]] | None:
    """The items of a bare list of plain numbers (`1,2,3`; not `(1,2)`), None for anything else."""
    items = [_number(x) for x in s.split(",")]
    # No percents: math-verify does not read 50\% in a list as 0.5.
    if len(items) < 2 or any(x is None or x[2] for x in items):
        return None
    return items


def _shape(s: str) -> str:
    """'letter' (a lone variable or choice), 'scalar' (a number or a simple expression),
    'tuple' (anything with a comma) or 'other'."""
    if len(s) == 1 and s.isascii() and s.isalpha() and s not in "ei":  # e and i are constants
        return "letter"
    if _number(s) is not None or values(s) is not None:
        return "scalar"
    return "tuple" if "," in s else "other"


def quick_check(gold: str, pred: str) -> bool | None:
    """True or False when the cheap rules decide, None when sympy is needed."""
    g, p = _normalize_gold(gold), normalize(pred)
    if g == p:
        return True
    # `x=3` against `3`: drop a lone variable assignment when only one side has one
    if ("=" in g) != ("=" in p):
        g, p = _LHS.sub("", g), _LHS.sub("", p)
        if g == p:
            return True
    gn, pn = _number(g), _number(p)
    if gn is not None and pn is not None:
        return _numbers_equal(gn, pn)
    # A bare list is a set to math-verify: 1,2 is 2,1 and 1,1,2, so compare item by item.
    gl, pl = _number_list(g), _number_list(p)
    if gl is not None and pl is not None:
        return all(any(_numbers_equal(a, b) for b in pl) for a in gl) and all(
            any(_numbers_equal(a, b) for a in gl) for b in pl
        )
    # A tuple is never a scalar or a lone letter, and two different lone letters are different.
    shapes = {_shape(g), _shape(p)}
    if shapes in ({"scalar", "tuple"}, {"letter", "tuple"}):
        return False
    if shapes == {"letter"} and g.lower() != p.lower():
        return False
    # Expressions whose values differ at some point cannot be equal. Only a rejection: equal
    # values may still be different expressions, which sympy decides. Not with words in
    # \text{}: once unwrapped, `1 \text{ or } 2` would read as the product 1*o*r*2.
    if _TEXT_COMMAND.search(gold) or _TEXT_COMMAND.search(pred):
        return None
    gv, pv = values(g), values(p)
    if gv is not None and pv is not None and differ(gv, pv):
        return False
    return None


_SYMBOLIC = Isolated("rayrl.rewards.symbolic")
# A ground truth like 3^{2^{2018}}-1 makes sympy time out against almost any answer; after a few
# timeouts its row skips sympy rather than making every response wait out the timeout.
MAX_TIMEOUTS_PER_GOLD = 2
_TIMEOUTS: Counter[str] = Counter()


def warm() -> None:
    """Start the isolated sympy worker ahead of the first call that needs it."""
    _SYMBOLIC.warm()


@lru_cache(maxsize=8192)
def _symbolic(gold: str, pred: str, timeout_s: float) -> str:
    # Cached: a GRPO group often repeats one wrong answer, and a pair that timed out once would again.
    if _TIMEOUTS[gold] >= MAX_TIMEOUTS_PER_GOLD:
        return "timeout"
    status, same = _SYMBOLIC.call("equivalent", (gold, pred), timeout_s)
    _TIMEOUTS[gold] += status == "timeout"
    if status != "ok":
        return status
    return "matched" if same else "wrong"


def score_math(response: str, ground_truth: str, timeout_s: float) -> Verdict:
    answer = last_boxed(final_text(response))
    if answer is None or not answer.strip():
        return Verdict(0.0, answer, "no_answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return Verdict(0.0, answer[:MAX_ANSWER_CHARS], "wrong")
    decided = quick_check(ground_truth, answer)
    if decided is not None:
        return Verdict.of(decided, answer)
    reason = _symbolic(clean(ground_truth), clean(answer), timeout_s)
    return Verdict(1.0 if reason == "matched" else 0.0, answer, reason)
