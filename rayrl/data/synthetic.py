"""A verifiable arithmetic task in the guru schema, deterministic by seed.

Prompts read "Q:a+b=?A:" and are answered "\\boxed{sum}"; the verifier compares the last
\\boxed{} to the ground truth exactly as an integer. Difficulty is the operands' digit
count (the level) and, within a level, the number of carries.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from rayrl.data.templates import apply_template

log = logging.getLogger(__name__)

SOURCE = "synthetic_arith"  # rayrl.rewards dispatches on the "synthetic" prefix

Operands = tuple[int, ...]


OP_WORDS = {"+": "plus", "-": "minus"}


def prompt_text(operands: Operands, op: str = "+", style: str = "compact") -> str:
    """compact: "Q:a+b=?A:", the tiny ladder's form; math: "What is a plus b?" inside the
    paper's math template; calc: a one-line instruction that asks for the boxed number, for
    small chat models that ramble past the template's box (SmolLM2-135M)."""
    if style == "math":
        return apply_template("math", f"What is {f' {OP_WORDS[op]} '.join(map(str, operands))}?")
    if style == "calc":
        expr = f" {op} ".join(map(str, operands))
        return f"Calculate {expr}. Give the final answer as \\boxed{{number}}."
    return "Q:" + op.join(map(str, operands)) + "=?A:"


def answer(operands: Operands, op: str = "+") -> int:
    return operands[0] - sum(operands[1:]) if op == "-" else sum(operands)


def completion_text(operands: Operands, op: str = "+") -> str:
    return f"\\boxed{{{answer(operands, op)}}}"


def carries(a: int, b: int) -> int:
    """Carries in column addition of a + b: a second source of difficulty within a level."""
    n, carry = 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        n += carry
        a, b = a // 10, b // 10
    return n


def level(operands: Operands) -> int:
    return max(len(str(x)) for x in operands)


def pass_rate_proxy(operands: Operands) -> float:
    """A prior guess of how often a small model solves it (higher = easier), so that the
    curriculum and the reuse sampler treat synthetic rows like guru rows' measured pass rate."""
    a, b = operands[0], operands[1]
    return round(0.5 ** (level(operands) - 1) * 0.8 ** carries(a, b), 6)


def make_row(
    operands: Operands,
    op: str,
    index: int,
    split: str,
    source: str = SOURCE,
    style: str = "compact",
) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": prompt_text(operands, op, style)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(answer(operands, op))},
        "extra_info": {
            "index": index,
            "split": split,
            "level": level(operands),
            "synthetic_pass_rate": pass_rate_proxy(operands),
        },
    }


def draw_pair(rng: random.Random, digits: int) -> Operands:
    """Two operands below 10**digits, at least one with exactly `digits` digits."""
    low = 10 ** (digits - 1) if digits > 1 else 0
    while True:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        if max(a, b) >= low:
            return a, b


def corpus_level(rng: random.Random, max_digits: int, hardest_share: float) -> int:
    """A `hardest_share` of the corpus has max_digits digits, the rest spreads evenly over
    fewer: the base model sees the hardest level rarely, which leaves RL its headroom."""
    if max_digits == 1 or rng.random() < hardest_share:
        return max_digits
    return rng.randint(1, max_digits - 1)


def level_capacity(digits: int) -> int:
    """Distinct ordered pairs at a level: 10^(2d) - 10^(2(d-1)), and 100 for d = 1."""
    return 10 ** (2 * digits) - (10 ** (2 * (digits - 1)) if digits > 1 else 0)


def allocate(total: int, caps: list[int]) -> list[int]:
    """Split `total` evenly over levels, never above a level's capacity; spill the rest upward."""
    counts = [0] * len(caps)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    left = total
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for j, i in enumerate(open_):
            counts[i] += min(share + (j < extra), caps[i] - counts[i])
        left = total - sum(counts)
        open_ = [i for i in open_ if counts[i] < caps[i]]
    return counts


def sample_unique(
    rng: random.Random, k: int, draw: Callable[[random.Random], Operands], exclude: set[Operands]
) -> list[Operands]:
    """`k` distinct operand tuples from `draw`, none in `exclude`."""
    seen: set[Operands] = set()
    out: list[Operands] = []
    for _ in range(50 * k + 10_000):
        if len(out) == k:
            break
        x = draw(rng)
        if x not in seen and x not in exclude:
            seen.add(x)
            out.append(x)
    if len(out) < k:
        raise ValueError(f"could only draw {len(out)} distinct problems of {k} requested")
    return out


def by_level(rng: random.Random, counts: list[int], exclude: set[Operands]) -> list[Operands]:
    out: list[Operands] = []
    for digits, k in enumerate(counts, start=1):
        out += sample_unique(rng, k, lambda r, d=digits: draw_pair(r, d), exclude)
    return out


def held_out(size: int, max_digits: int, seed: int) -> list[Operands]:
    """The held-out problems: levels 1..max_digits evenly, using at most half of any level."""
    caps = [level_capacity(d) // 2 for d in range(1, max_digits + 1)]
    return by_level(random.Random(f"{seed}:test"), allocate(size, caps), set())


def training(size: int, max_digits: int, seed: int, exclude: set[Operands]) -> list[Operands]:
    """Training problems, levels 1..max_digits evenly as far as each level allows."""
    caps = [
        level_capacity(d) - sum(level((a, b)) == d for a, b in exclude)
        for d in range(1, max_digits + 1)
    ]
    counts = allocate(size, caps)
    if sum(counts) < size:
        log.warning(
            "only %d distinct training problems exist up to %d digits (%d asked)",
            sum(counts),
            max_digits,
            size,
        )
    return by_level(random.Random(f"{seed}:train"), counts, exclude)


def uneven_pair(rng: random.Random, max_digits: int) -> Operands:
    """A 2..max_digits-digit operand plus a shorter one: in-domain, but rare in the even mix."""
    digits = rng.randint(min(2, max_digits), max_digits)
    long_ = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)
    short = rng.randrange(10 ** rng.randint(1, max(1, digits - 1)))
    return (long_, short) if rng.random() < 0.5 else (short, long_)


def subtraction_pair(rng: random.Random, max_digits: int) -> Operands:
    a, b = draw_pair(rng, rng.randint(1, max_digits))
    return (max(a, b), min(a, b))


def evals(
    size: int, max_digits: int, seed: int, exclude: set[Operands], style: str = "compact"
) -> dict[str, list[dict]]:
    """In-domain and out-of-domain evaluation sets, as guru rows.

    add_uneven: addition with operands of different lengths (in-domain, different mix);
    sub: subtraction, never trained (out-of-domain); add_long: one digit more than training
    (out-of-domain length generalisation).
    """
    rng = random.Random(f"{seed}:evals")
    uneven = sample_unique(rng, size, lambda r: uneven_pair(r, max_digits), exclude)
    sub = sample_unique(rng, size, lambda r: subtraction_pair(r, max_digits), set())
    long_ = sample_unique(rng, size, lambda r: draw_pair(r, max_digits + 1), set())
    return {
        "add_uneven": to_rows(uneven, "+", "eval", f"{SOURCE}_add_uneven", style),
        "sub": to_rows(sub, "-", "eval", f"{SOURCE}_sub", style),
        "add_long": to_rows(long_, "+", "eval", f"{SOURCE}_add_long", style),
    }


def to_rows(
    problems: list[Operands], op: str, split: str, source: str = SOURCE, style: str = "compact"
) -> list[dict]:
    """Guru rows for `problems`, indexed in order."""
    return [make_row(p, op, i, split, source, style) for i, p in enumerate(problems)]


def synthetic_task(
    train_size: int,
    test_size: int,
    max_digits: int,
    seed: int,
    eval_size: int = 200,
    style: str = "compact",
) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """(train, test, evals) as guru rows with prompts of `style` (see prompt_text); test is
    disjoint from train and evals."""
    test = held_out(test_size, max_digits, seed)
    train = training(train_size, max_digits, seed, exclude=set(test))
    return (
        to_rows(train, "+", "train", style=style),
        to_rows(test, "+", "test", style=style),
        evals(eval_size, max_digits, seed, set(test), style),
    )
