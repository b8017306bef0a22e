"""Tests for gainrl.synthetic: determinism, levels and verifiable answers."""

from __future__ import annotations

import ast
import operator
from collections import Counter

import pytest

from gainrl.synthetic import LEVELS, make_arithmetic_dataset

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(expression: str) -> int:
    """Evaluate an integer + - * // expression without eval; // must be exact."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.FloorDiv):
                assert left % right == 0, f"inexact division in {expression}"
            return _OPS[type(node.op)](left, right)
        raise AssertionError(f"unexpected node {ast.dump(node)} in {expression}")

    return walk(ast.parse(expression, mode="eval"))


def test_deterministic_for_a_seed():
    a, b = make_arithmetic_dataset(100, seed=3), make_arithmetic_dataset(100, seed=3)
    assert a == b
    assert a != make_arithmetic_dataset(100, seed=4)


def test_answers_levels_and_indices():
    data = make_arithmetic_dataset(500, seed=0)
    assert [e.index for e in data] == list(range(500))
    assert Counter(e.meta["level"] for e in data) == {lv: 100 for lv in LEVELS}
    assert len({e.question for e in data}) == 500
    for e in data:
        assert e.answer == str(evaluate(e.meta["expression"]))
        assert e.meta["source"] == "synthetic-arithmetic"
    # levels are not laid out in a periodic pattern
    assert [e.meta["level"] for e in data[:10]] != [1, 2, 3, 4, 5] * 2


def test_difficulty_grows_with_level():
    data = make_arithmetic_dataset(500, seed=1)
    ops = {lv: [] for lv in LEVELS}
    lengths = {lv: [] for lv in LEVELS}
    for e in data:
        ops[e.meta["level"]].append(sum(e.meta["expression"].count(c) for c in "+-*/"))
        lengths[e.meta["level"]].append(len(e.question))
    mean = {lv: sum(v) / len(v) for lv, v in ops.items()}
    assert mean[1] == 1 and mean[2] == 1 and mean[3] == 2 and mean[4] >= 3 and mean[5] >= 2
    assert min(lengths[5]) > max(lengths[4])  # word problems
    assert all("(" in e.meta["expression"] for e in data if e.meta["level"] == 4)


def test_level_selection_and_validation():
    only = make_arithmetic_dataset(20, seed=0, levels=[5])
    assert {e.meta["level"] for e in only} == {5}
    assert make_arithmetic_dataset(0, seed=0) == []
    with pytest.raises(ValueError, match="levels"):
        make_arithmetic_dataset(5, seed=0, levels=[6])
    with pytest.raises(ValueError, match="levels"):
        make_arithmetic_dataset(5, seed=0, levels=[])
    with pytest.raises(ValueError, match="n must"):
        make_arithmetic_dataset(-1)
    with pytest.raises(ValueError, match="seed"):
        make_arithmetic_dataset(5, seed=1.5)


def test_answers_pass_the_accuracy_reward():
    pytest.importorskip("math_verify")
    from gainrl.rewards import accuracy_reward

    data = make_arithmetic_dataset(10, seed=2)
    completions = [f"<think> ... </think> <answer> {e.answer} </answer>" for e in data]
    assert accuracy_reward(completions, [e.answer for e in data]) == [1.0] * 10
    wrong = [f"<answer> {int(e.answer) + 1} </answer>" for e in data]
    assert accuracy_reward(wrong, [e.answer for e in data]) == [0.0] * 10
