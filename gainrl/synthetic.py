"""A seeded synthetic arithmetic data set with graded difficulty and verifiable integer answers.

Levels (``meta["level"]``):

1. ``a + b`` with small integers (1..20);
2. ``a + b`` / ``a - b`` with two-digit integers (results may be negative);
3. three operands with a product: ``a * b + c``, ``a + b * c``, ``a * b - c`` (operator precedence);
4. four operands with parentheses and an exact division: ``(a + b) * c - d``, ``a * (b - c) + d``, ``(a * b) / c + d``;
5. multi-step word problems (buying, change, pages read, distance, equal sharing).

Every example carries ``meta["expression"]``, a Python integer expression whose value is the answer, so the
answers can be checked independently. Generation depends on ``seed`` only (``random.Random``), so the same
arguments give the same data set on every platform.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from gainrl.data import Example

LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
SOURCE = "synthetic-arithmetic"

_NAMES = ("Alice", "Ben", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps")

Problem = tuple[str, str, int]  # (question, expression, answer)


def _level1(rng: random.Random) -> Problem:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} + {b}?", f"{a} + {b}", a + b


def _level2(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b}", a + b
    return f"What is {a} - {b}?", f"{a} - {b}", a - b


def _level3(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 50)
    form = rng.randrange(3)
    if form == 0:
        expr, value = f"{a} * {b} + {c}", a * b + c
    elif form == 1:
        expr, value = f"{c} + {a} * {b}", c + a * b
    else:
        expr, value = f"{a} * {b} - {c}", a * b - c
    return f"What is {expr}?", expr, value


def _level4(rng: random.Random) -> Problem:
    form = rng.randrange(3)
    if form == 0:
        a, b, c, d = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9), rng.randint(1, 60)
        expr, value = f"({a} + {b}) * {c} - {d}", (a + b) * c - d
    elif form == 1:
        a, b, c, d = rng.randint(2, 9), rng.randint(10, 40), rng.randint(1, 30), rng.randint(1, 60)
        expr, value = f"{a} * ({b} - {c}) + {d}", a * (b - c) + d
    else:
        c, k, b, d = rng.randint(2, 9), rng.randint(1, 6), rng.randint(2, 15), rng.randint(1, 40)
        a = c * k  # so that (a * b) / c = k * b is exact
        expr, value = f"({a} * {b}) / {c} + {d}", (a * b) // c + d
        return f"What is {expr}?", f"({a} * {b}) // {c} + {d}", value
    return f"What is {expr}?", expr, value


def _level5(rng: random.Random) -> Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    form = rng.randrange(5)
    if form == 0:
        a, b, c = rng.randint(5, 40), rng.randint(2, 9), rng.randint(3, 12)
        d = rng.randint(1, a + b * c)
        question = (
            f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag and then gives away {d} "
            f"{item}. How many {item} does {name} have now?"
        )
        return question, f"{a} + {b} * {c} - {d}", a + b * c - d
    if form == 1:
        price, count = rng.randint(2, 15), rng.randint(2, 9)
        bill = next(v for v in (20, 50, 100, 200) if v >= price * count)
        question = (
            f"A shop sells {item} for {price} dollars each. {name} buys {count} of them and pays with a "
            f"{bill}-dollar bill. How many dollars of change does {name} get?"
        )
        return question, f"{bill} - {price} * {count}", bill - price * count
    if form == 2:
        a = rng.randint(5, 40)
        b = rng.randint(1, 2 * a - 1)
        question = (
            f"{name} reads {a} pages on Monday and twice as many pages on Tuesday. On Wednesday {name} reads "
            f"{b} pages fewer than on Tuesday. How many pages does {name} read over the three days?"
        )
        return question, f"{a} + 2 * {a} + (2 * {a} - {b})", a + 2 * a + (2 * a - b)
    if form == 3:
        s1, h1, s2, h2 = rng.randint(30, 90), rng.randint(2, 5), rng.randint(30, 90), rng.randint(2, 5)
        question = (
            f"A train travels at {s1} km per hour for {h1} hours and then at {s2} km per hour for {h2} hours. "
            f"How many km does it travel in total?"
        )
        return question, f"{s1} * {h1} + {s2} * {h2}", s1 * h1 + s2 * h2
    friends, share = rng.randint(2, 9), rng.randint(3, 15)
    give_back = rng.randint(1, share - 1)
    total = friends * share
    question = (
        f"{name} shares {total} {item} equally among {friends} friends. Then each friend gives {give_back} "
        f"{item} back to {name}. How many {item} does each friend have now?"
    )
    return question, f"{total} // {friends} - {give_back}", share - give_back


_GENERATORS: dict[int, Callable[[random.Random], Problem]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}


def make_arithmetic_dataset(
    n: int,
    seed: int = 0,
    levels: Sequence[int] = LEVELS,
    *,
    unique: bool = True,
    max_tries: int = 50,
) -> list[Example]:
    """``n`` synthetic arithmetic examples, deterministic for ``seed``.

    Levels are balanced (``n // len(levels)`` each, the remainder going to the first levels) and the examples
    are shuffled, so the list order carries no difficulty signal.

    Args:
        n: number of examples (``>= 0``).
        seed: integer seed.
        levels: difficulty levels to draw from, each in ``1..5`` (duplicates weight a level more).
        unique: avoid repeated questions, trying at most ``max_tries`` draws per example (small levels have
            few distinct questions; after ``max_tries`` a repeat is accepted).
        max_tries: see ``unique``.

    Returns:
        ``Example(index=i, question, answer=str(int), meta={"level", "expression", "source"})``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    levels = list(levels)
    if not levels:
        raise ValueError("levels must not be empty")
    bad = [lv for lv in levels if lv not in _GENERATORS]
    if bad:
        raise ValueError(f"levels must be in {sorted(_GENERATORS)}, got {bad}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")

    rng = random.Random(seed)
    plan = [levels[i % len(levels)] for i in range(n)]
    rng.shuffle(plan)
    seen: set[str] = set()
    examples: list[Example] = []
    for index, level in enumerate(plan):
        for _ in range(max_tries if unique else 1):
            question, expression, value = _GENERATORS[level](rng)
            if question not in seen:
                break
        seen.add(question)
        examples.append(
            Example(
                index=index,
                question=question,
                answer=str(value),
                meta={"level": level, "expression": expression, "source": SOURCE},
            )
        )
    return examples
