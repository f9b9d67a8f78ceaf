"""Values of simple LaTeX answers at fixed points, to reject wrong answers without sympy.

Understood: numbers, + - * / ^, \\frac, \\sqrt, \\sqrt[n], \\pi, e, brackets and one-letter
variables (with implicit products, read the way math-verify reads them: `2n`, `kn`, `\\pi r^2`).
Anything else (functions, sets, factorials, `i`, mixed numbers like 3\\frac{1}{2}, `2^10`) gives
None and the caller falls back to math-verify. Two answers whose values differ at some point
are not the same expression; equal values prove nothing, so this is only ever used to reject.
Input is the normalized string (see math.normalize).
"""

from __future__ import annotations

import math
import random
import re
import string

MAX_CHARS = 200  # keeps the recursive descent shallow
_TOKEN = re.compile(
    r"\d+(?:\.\d+)?|\\(?:frac|sqrt|pi|cdot|times)(?![A-Za-z])|[A-Za-z]|[-+*/^(){}\[\] ]", re.ASCII
)
_STARTS_PRIMARY = ("(", "{", "\\frac", "\\sqrt", "\\pi")
# `i` is the imaginary unit and `E` a variable named e to math-verify; anything else is a variable
# (case-folded, as math-verify does), except `e`, Euler's number.
_NOT_VARIABLES = set("iIE")
# Positive points: math-verify may assume positive symbols (sqrt{x^2} = x).
_rng = random.Random(20240531)
POINTS = [{c: _rng.uniform(0.6, 1.9) for c in string.ascii_lowercase} for _ in range(2)]


class _Refuse(Exception):
    pass


class _Parser:
    def __init__(self, tokens: list[str], env: dict[str, float]):
        self.tokens, self.env, self.i = tokens, env, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Refuse
        self.i += 1
        return tok

    def expr(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> float:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "/", "\\cdot", "\\times"):
                self.take()
                rhs = self.unary()
                value = value / rhs if tok == "/" else value * rhs
            elif tok in _STARTS_PRIMARY or (tok is not None and tok.isalpha()):
                if tok == "\\frac" and self.tokens[self.i - 1][0].isdigit():
                    raise _Refuse  # 3\frac{1}{2} is a mixed number to math-verify
                value *= self.unary()
            else:
                return value

    def unary(self) -> float:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        base = self.primary()
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() != "{" and len(self.peek() or "") > 1:
            raise _Refuse  # 2^10: LaTeX reads 2^1 then 0, math-verify 2^{10}
        exponent = self.unary()
        if base < 0 and not exponent.is_integer():
            raise _Refuse
        return base**exponent

    def group(self) -> float:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def primary(self) -> float:
        tok = self.take()
        if tok[0].isdigit():
            return float(tok)
        if tok.isalpha():
            if tok in _NOT_VARIABLES or self.peek() == "(":
                raise _Refuse  # f(x) is a function application to math-verify
            return math.e if tok == "e" else self.env[tok.lower()]
        if tok == "\\pi":
            return math.pi
        if tok in ("(", "{"):
            value = self.expr()
            self.take(")" if tok == "(" else "}")
            return value
        if tok == "\\frac":
            return self.group() / self.group()
        if tok == "\\sqrt":
            n = 2.0
            if self.peek() == "[":
                self.take()
                n = self.expr()
                self.take("]")
            x = self.group()
            if x < 0 or n <= 0:
                raise _Refuse
            return x ** (1.0 / n)
        raise _Refuse


def values(latex: str) -> tuple[float, ...] | None:
    """The answer's value at each of POINTS, or None if it is outside the grammar."""
    if not latex or len(latex) > MAX_CHARS:
        return None
    tokens = _TOKEN.findall(latex)
    if "".join(tokens) != latex:
        return None
    tokens = [t for t in tokens if t != " "]  # normalize() keeps one only after a command name
    out = []
    for env in POINTS:
        parser = _Parser(tokens, env)
        try:
            result = parser.expr()
        except (_Refuse, ZeroDivisionError, OverflowError, RecursionError):
            return None
        if parser.peek() is not None or not math.isfinite(result):
            return None
        out.append(result)
    return tuple(out)


def differ(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """True if the values differ by more than any 6-decimal rounding could hide, at some point."""
    return any(abs(x - y) > 1e-6 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))
