"""Tests for gainrl.rewards: answer extraction, math_verify comparison on tricky answers, registry."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("math_verify")

from gainrl import rewards  # noqa: E402
from gainrl.rewards import (  # noqa: E402
    accuracy_reward,
    combine_rewards,
    extract_answer,
    format_reward,
    get_reward,
    is_correct,
    register_reward,
)


def tagged(answer: str) -> str:
    return f"<think> some reasoning 7 + 8 = 15 </think> <answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (tagged(" 42 "), "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("so the result is \\boxed{\\frac{1}{2}} and not \\boxed{3}", "3"),
        ("nested \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("We get 12 apples, then 1,000 pears.", "1,000"),
        ("Temperature drops to -7 degrees", "-7"),
        ("it is 3.25.", "3.25"),
        ("no digits here", None),
        ("", None),
        (tagged("   "), None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (tagged("1,000"), "1000"),
        (tagged("1000"), "1,000"),
        (tagged("\\frac{1}{2}"), "0.5"),
        (tagged("0.5"), "\\frac{1}{2}"),
        ("The answer is \\boxed{3}.", "3"),
        (tagged("$12$"), "12"),
        (tagged("-3"), "-3"),
        ("so she ends at -15 dollars", "-15"),
        (tagged("x=5"), "5"),
        (tagged("x = 5"), "5"),
        (tagged("0.75"), "\\dfrac{3}{4}"),
        (tagged("\\frac{3}{4}"), "\\dfrac{3}{4}"),
        (tagged("3/4"), "\\dfrac{3}{4}"),
        (tagged("2\\sqrt{3}"), "2\\sqrt{3}"),
        (tagged("\\boxed{2\\sqrt{3}}"), "\\sqrt{12}"),
        (tagged("42 apples"), "42"),
        (tagged("18.00"), "18"),
        ("Natalia sold 48 + 24 = 72 clips.", "72"),
        (tagged("(1, 2)"), "(1,2)"),
        (tagged("18 dollars"), "18"),
        (tagged("\\$18"), "18"),
        (tagged("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        (tagged("\\text{Devon}"), "\\text{Devon}"),
        (tagged("10\\%"), "10"),
        (tagged("5 cm"), "5"),
        (tagged("2xy + 10x + 20y + 100"), "2xy + 10x + 20y + 100"),  # `xy` is no English word
    ],
)
def test_correct(completion, answer):
    assert is_correct(completion, answer)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (tagged("3"), "-3"),
        (tagged("2"), "2\\sqrt{3}"),  # "2\sqrt{3}" must not be read as 2
        (tagged("2\\sqrt{3}"), "2"),
        (tagged("1,001"), "1000"),
        (tagged("1, 2, 3"), "3"),  # a list is not its last element
        (tagged("Nevod"), "\\text{Devon}"),
        (tagged("0.5"), "\\dfrac{3}{4}"),
        ("no answer at all", "5"),
        ("", "0"),
        (tagged("5"), None),
        (tagged("5"), ""),
        (tagged("\\frac{"), "1"),  # malformed LaTeX: not correct, no exception
        (tagged("}}}{{{\\\\"), "1"),
    ],
)
def test_incorrect(completion, answer):
    assert not is_correct(completion, answer)


def test_accuracy_reward_on_a_batch_and_length_check():
    completions = [tagged("72"), tagged("71"), "\\boxed{\\dfrac{3}{4}}", "none"]
    answers = ["72", "72", "0.75", "1"]
    assert accuracy_reward(completions, answers) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="length"):
        accuracy_reward(completions, answers[:2])


def test_exceptions_inside_math_verify_give_zero(monkeypatch):
    import math_verify

    def boom(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "verify", boom)
    assert accuracy_reward([tagged("4")], ["4"]) == [0.0]

    class Timeout(BaseException):  # math_verify's TimeoutException is a BaseException
        pass

    def slow(*args, **kwargs):
        raise Timeout()

    monkeypatch.setattr(math_verify, "parse", slow)
    rewards.parse_reference.cache_clear()
    assert accuracy_reward([tagged("4")], ["4"]) == [0.0]
    rewards.parse_reference.cache_clear()


def test_works_outside_the_main_thread():
    out: list[list[float]] = []
    worker = threading.Thread(target=lambda: out.append(accuracy_reward([tagged("\\frac{1}{2}")], ["0.5"])))
    worker.start()
    worker.join()
    assert out == [[1.0]]


def test_format_reward():
    completions = [
        "<think> 2 + 2 = 4 </think> <answer> 4 </answer>",
        "<think>\nmulti\nline\n</think>\n<answer>4</answer>\n",
        "<answer> 4 </answer>",
        "<think> x </think> <answer> 4 </answer> trailing",
        "4",
    ]
    assert format_reward(completions, [None] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_registry():
    assert get_reward("accuracy") is accuracy_reward
    assert get_reward("format") is format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(accuracy_reward)

    @register_reward("test_length")
    def length_reward(completions, answers):
        return [float(len(c)) for c in completions]

    try:
        combined = combine_rewards({"accuracy": 1.0, "format": 0.5})
        assert combined([tagged("4"), "4", "<answer>3</answer>"], ["4", "4", "4"]) == [1.5, 1.0, 0.0]
        assert get_reward("test_length")(["abc"], ["x"]) == [3.0]
    finally:
        del rewards.REWARDS["test_length"]
