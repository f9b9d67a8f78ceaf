"""Verifier behaviour on hand-written cases: extraction, the equivalences the issue names, dispatch."""

from __future__ import annotations

import json
import threading

import pytest

from rayrl.rewards import Verdict, score, score_detailed, verifier_for
from rayrl.rewards.extract import last_boxed
from rayrl.rewards.math import quick_check
from rayrl.rewards.numeric import values


def boxed(answer: str) -> str:
    return f"Let me think. First $x = 2$, so $y = 7$. ... so the answer is \\boxed{{{answer}}}."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a \\boxed{1} b \\boxed{2} c", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\fbox{7}", "7"),
        ("the answer is \\boxed 5$.", "5"),
        ("\\boxed{unclosed", None),
        ("no box at all", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_answer_after_think_wins() -> None:
    response = "<think>maybe \\boxed{3}, maybe not</think> Final: \\boxed{4}"
    assert score("math__x", response, "4") == 1.0
    assert score("math__x", "<think>I guess \\boxed{4}</think> no idea", "4") == 0.0


# The forms the issue names, plus a few more; expected values are plain mathematics.
EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac12"),
    ("0.5", "\\tfrac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("50", "50.0"),
    ("50", "50^\\circ"),
    ("50", "50^{\\circ}"),
    ("50", "50 \\text{ degrees}"),
    ("(1, 2)", "(1,2)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
    ("(3, \\frac{\\pi}{2})", "(3, \\frac{2\\pi}{4})"),  # tuple needing sympy
    ("[1, 3)", "[1,3)"),
    ("(-\\infty, 2]", "\\left(-\\infty, 2\\right]"),
    ("[\\frac{1}{16}, 1)", "[0.0625, 1)"),  # interval needing sympy
    ("3", "x=3"),
    ("x = 3", "3"),
    ("50\\%", "50"),
    ("50\\%", "0.5"),
    ("50", "50\\%"),
    ("1,000", "1000"),
    ("\\$18.90", "18.9"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("n(n+1)", "n^2+n"),
    ("\\\\frac{1}{4}", "\\frac14"),  # guru's doubled backslashes
    ("\\text{(C)}", "C"),
    ("-\\frac{3}{4}", "-0.75"),
    ("\\pi r^2", "r^2\\pi"),
    ("\\frac{1}{3}", "0.333333"),  # as math-verify: decimals agree to 6 places
    ("14916", "14{,}916"),  # LaTeX thousands separators
    ("32349", "32,\\! 349"),
    ("1, 2", "2, 1"),  # a bare list is a set, as to math-verify
    # a row break before \end is not a doubled escape
    ("\\begin{pmatrix} 1 \\\\ 2 \\\\\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
]
DIFFERENT = [
    ("\\frac{1}{2}", "0.4"),
    ("50", "51"),
    ("50", "5"),
    ("(1, 2)", "(2, 1)"),
    ("[1, 3)", "[1, 3]"),
    ("3", "x=4"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("2n-1", "2n+1"),
    ("n(n+1)", "n^2-n"),
    ("x", "y"),
    ("A", "B"),
    ("12", "(1, 2)"),
    ("0.333", "\\frac{1}{3}"),
    ("10^{20}", "10^{20}+1"),
    ("32349", "32, 349"),  # a comma and a space separate a list: never one number
    ("1,000", "1, 000"),
    ("1, 2", "1, 3"),
]


@pytest.mark.parametrize(("gold", "pred"), EQUIVALENT)
def test_equivalent_forms_match(gold: str, pred: str) -> None:
    v = score_detailed("math__x", boxed(pred), gold)
    assert (v.score, v.reason) == (1.0, "matched"), v


@pytest.mark.parametrize(("gold", "pred"), DIFFERENT)
def test_different_answers_do_not_match(gold: str, pred: str) -> None:
    v = score_detailed("math__x", boxed(pred), gold)
    assert (v.score, v.reason) == (0.0, "wrong"), v


@pytest.mark.parametrize(("gold", "pred"), EQUIVALENT + DIFFERENT)
def test_cheap_path_never_contradicts_sympy(gold: str, pred: str) -> None:
    # quick_check may abstain (None), but when it decides it must agree with the full answer
    expected = (gold, pred) in EQUIVALENT
    assert quick_check(gold, pred) in (None, expected)


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        ("1+2\\cdot3", 7.0),
        ("\\frac{1}{4}+\\frac{\\sqrt{3}}{2}", 0.25 + 3**0.5 / 2),
        ("\\sqrt[3]{27}", 3.0),
        ("2^{10}", 1024.0),
        ("-(2+3)^{2}", -25.0),
        ("48\\pi", 48 * 3.141592653589793),
    ],
)
def test_numeric_values_of_constants(latex: str, expected: float) -> None:
    got = values(latex)
    assert got is not None and all(abs(g - expected) < 1e-9 for g in got)


@pytest.mark.parametrize("latex", ["3\\frac{1}{2}", "2^10", "f(x)", "i^2", "n!", "\\sin x", "1,2"])
def test_numeric_refuses_what_it_cannot_read_like_math_verify(latex: str) -> None:
    assert values(latex) is None


def test_no_answer_and_empty_box() -> None:
    assert score_detailed("math__x", "I give up.", "3").reason == "no_answer"
    assert score_detailed("math__x", "so \\boxed{}", "3").reason == "no_answer"
    assert score_detailed("math__x", "so \\boxed{ }", "3").reason == "no_answer"


def test_synthetic_exact_integer() -> None:
    assert score("synthetic_arith", "Q:12+34=?A:\\boxed{46}", "46") == 1.0
    assert score("synthetic_arith", "\\boxed{ 46 }", "46") == 1.0
    assert score("synthetic_arith", "\\boxed{-7}", "-7") == 1.0
    assert score("synthetic_arith", "\\boxed{45}", "46") == 0.0
    assert score("synthetic_arith", "\\boxed{46.0}", "46") == 0.0  # exact integer only
    assert score("synthetic_arith", "\\boxed{４６}", "46") == 0.0  # fullwidth look-alike digits
    assert score("synthetic_arith", "\\boxed{46} then \\boxed{47}", "46") == 0.0  # the last box
    assert score_detailed("synthetic_arith", "46", "46").reason == "no_answer"
    assert score_detailed("synthetic_arith", "\\boxed{}", "46").reason == "no_answer"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("\\boxed{B}", 1.0),
        ("\\boxed{(B)}", 1.0),
        ("\\boxed{B: 0.58g}", 1.0),
        ("\\boxed{\\text{B}}", 1.0),
        ("\\boxed{b}", 1.0),
        ("\\boxed{C}", 0.0),
        ("\\boxed{Because}", 0.0),
        ("\\boxed{0.58g}", 0.0),
        ("\\boxed{В}", 0.0),  # Cyrillic Ve, a look-alike of B
    ],
)
def test_stem_letter(response: str, expected: float) -> None:
    assert score("stem__supergpqa", response, "B") == expected


TABLE = {
    "header": ["Position", "Pet", "Job"],
    "rows": [["1", "cat", "writer"], ["2", "dog", "dancer"]],
}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (json.dumps(TABLE), 1.0),
        (
            '{"header": ["Position", "Job", "Pet"], "rows": [["1", "writer", "cat"], ["2", "dancer", "dog"]]}',
            1.0,
        ),
        (
            "{'header': ['position', 'pet', 'job'], 'rows': [['1', 'Cat', 'writer'], ['2', 'dog', 'dancer']]}",
            1.0,
        ),
        (
            '{"header": ["Position", "Pet", "Job"], "rows": [["1", "dog", "writer"], ["2", "cat", "dancer"]]}',
            0.0,
        ),
        ('{"header": ["Position", "Pet"], "rows": [["1", "cat"], ["2", "dog"]]}', 0.0),
        ("not json", 0.0),
    ],
)
def test_logic_table(answer: str, expected: float) -> None:
    response = f"Reasoning... <answer> {answer} </answer>"
    assert score("logic__zebra_puzzle_dataset", response, TABLE) == expected
    assert score("logic__zebra_puzzle_dataset", response, json.dumps(TABLE)) == expected


def test_logic_without_answer_tag() -> None:
    assert score_detailed("logic__zebra", json.dumps(TABLE), TABLE).reason == "no_answer"


def test_codegen_functional_tests() -> None:
    tests = json.dumps({"functional": "def check(f):\n    assert f(2) == 3\n\ncheck(inc)\n"})
    right = "Here:\n```python\ndef inc(x):\n    return x + 1\n```\nDone."
    wrong = "```python\ndef inc(x):\n    return x\n```"
    assert score_detailed("codegen__humaneval", right, tests).reason == "matched"
    assert score_detailed("codegen__humaneval", wrong, tests).reason == "wrong"
    assert (
        score_detailed("codegen__humaneval", "def inc(x): return x + 1", tests).reason
        == "no_answer"
    )
    exits_early = "```python\nimport sys\ndef inc(x):\n    return x\nsys.exit(0)\n```"
    assert score("codegen__humaneval", exits_early, tests) == 0.0  # exit(0) is not a pass


@pytest.mark.parametrize(
    ("data_source", "ability", "kind"),
    [
        ("math__deepscaler_preview", None, "math"),
        ("math__math", None, "math"),
        ("openai/gsm8k", "math", "math"),
        ("aime2024", "math", "math"),
        ("aimeamc2023", "math", "math"),
        ("stem__supergpqa", "stem", "stem"),
        ("logic__zebra_puzzle_dataset", "logical_reasoning", "logic"),
        ("codegen__humaneval", "codegen", "code"),
        ("synthetic_arith", None, "synthetic"),
        ("some/new_dataset", "logical_reasoning", "logic"),
        ("some/new_dataset", None, "math"),
    ],
)
def test_dispatch(data_source: str, ability: str | None, kind: str) -> None:
    assert verifier_for(data_source, ability) == kind


def test_verifier_errors_become_verdicts() -> None:
    v = score_detailed("logic__zebra", "<answer>{}</answer>", "not json either")
    assert isinstance(v, Verdict) and (v.score, v.reason) == (0.0, "error")


def test_score_from_threads() -> None:
    # signal.alarm-based timeouts fail off the main thread; ours must not
    results: list[Verdict] = []
    threads = [
        threading.Thread(
            target=lambda g=g: results.append(
                score_detailed("math__x", boxed("2^{10^{10}}"), g, timeout_s=1.0)
            )
        )
        for g in ("7", "8")
    ] + [
        threading.Thread(
            target=lambda: results.append(
                score_detailed("math__x", boxed("\\sqrt{8}"), "2\\sqrt{2}")
            )
        )
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(v.reason for v in results) == ["matched", "timeout", "timeout"]
