"""Tests for gainrl.data: formats, sources, malformed rows and the load report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gainrl.data import Example, RowError, last_boxed, load_examples, normalize_reference_answer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

GAINRL_ROWS = [
    {"problem": "What is 1 + 1?", "answer": "2", "level": 1},
    {"problem": "  ", "answer": "3"},  # empty question
    {"answer": "4"},  # no question
    {"problem": "Find x if 2x = 10.", "answer": None},  # no answer
    {"question": "Janet has 3 eggs ... how many?", "answer": "She has 3 + 997 eggs.\n#### 1,000"},  # raw GSM8K
    {"problem": "Compute 1/2 + 1/4.", "solution": "We get $\\boxed{\\frac{3}{4}}$."},  # raw MATH
    {"problem": "Integer answer column", "answer": 72.0},
]


def verl_row(question, ground_truth, extra_question=None, **extra_cols):
    content = question + " Let's think step by step and output the final answer within \\boxed{}."
    extra = {"index": 0, "split": "train"}
    if extra_question is not None:
        extra["question"] = extra_question
    return {
        "data_source": "test",
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"ground_truth": ground_truth, "style": "rule"},
        "extra_info": extra,
        **extra_cols,
    }


VERL_ROWS = [
    verl_row("Let $f(x)=x^2$. Find $f(3)$.", "9", level="Level 2", type="Algebra"),
    verl_row("ignored text", "72", extra_question="Natalia sold 48 clips... How many?", level="Level 1", type="x"),
    verl_row("What is $\\frac{3}{4}$ of 1?", "\\dfrac{3}{4}", level="Level 3", type="Prealgebra"),
    verl_row("", "1", level="Level ?", type="x"),  # empty question
    verl_row("No answer here?", "", level="Level 5", type="x"),  # empty ground truth
]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_gainrl_json(tmp_path):
    examples, report = load_examples(write_json(tmp_path / "d.json", GAINRL_ROWS))
    assert report.fmt == "gainrl"
    assert [e.index for e in examples] == [0, 3, 4, 5, 6]
    assert examples[0] == Example(0, "What is 1 + 1?", "2", {"level": 1})
    assert examples[1].answer is None
    assert examples[2].answer == "1000"  # GSM8K "#### 1,000" -> final number without separator
    assert examples[3].answer == "\\frac{3}{4}"  # last \boxed of the solution
    assert examples[3].meta == {"solution": "We get $\\boxed{\\frac{3}{4}}$."}
    assert examples[4].answer == "72"
    assert (report.n_rows, report.n_loaded, report.n_skipped) == (7, 5, 2)
    assert report.reasons() == {"missing question": 2}
    assert [s.index for s in report.skipped] == [1, 2]
    assert "skipped 2" in report.summary() and "rows 1, 2" in report.summary()


def test_require_answers_and_strict(tmp_path):
    path = write_json(tmp_path / "d.json", GAINRL_ROWS)
    examples, report = load_examples(path, require_answers=True)
    assert [e.index for e in examples] == [0, 4, 5, 6]
    assert report.reasons() == {"missing question": 2, "missing answer": 1}
    with pytest.raises(ValueError, match="row 1 .*missing question") as err:
        load_examples(path, strict=True)
    assert isinstance(err.value, RowError) and err.value.index == 1
    ok = write_json(tmp_path / "ok.json", [GAINRL_ROWS[0], GAINRL_ROWS[3]])
    assert len(load_examples(ok, strict=True)[0]) == 2
    with pytest.raises(ValueError, match="row 1 .*missing answer"):
        load_examples(ok, strict=True, require_answers=True)


def test_json_layouts_and_jsonl(tmp_path):
    columns = {"problem": ["a?", "b?"], "answer": ["1", "2"]}
    assert [e.question for e in load_examples(write_json(tmp_path / "c.json", columns))[0]] == ["a?", "b?"]
    wrapped = {"data": [{"problem": "a?", "answer": "1"}]}
    assert len(load_examples(write_json(tmp_path / "w.json", wrapped))[0]) == 1

    lines = ['{"problem": "a?", "answer": "1"}', "", "{not json", '"a string row"', '{"problem": "d?", "answer": 4}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, report = load_examples(path)
    assert [(e.index, e.answer) for e in examples] == [(0, "1"), (3, "4")]  # blank lines are not rows
    assert report.n_rows == 4
    assert [s.index for s in report.skipped] == [1, 2]
    assert report.skipped[0].reason.startswith("invalid JSON (line 3)")
    assert report.skipped[1].reason == "row is a str, not an object"
    with pytest.raises(ValueError, match="row 1 .*invalid JSON"):
        load_examples(path, strict=True)


def test_verl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), path)
    examples, report = load_examples(path)
    assert report.fmt == "verl"
    assert [e.index for e in examples] == [0, 1, 2, 4]
    assert examples[0].question == "Let $f(x)=x^2$. Find $f(3)$."  # last user message, instruction removed
    assert examples[1].question == "Natalia sold 48 clips... How many?"  # extra_info.question wins
    assert examples[2].answer == "\\dfrac{3}{4}"  # LaTeX ground truth kept verbatim
    assert examples[0].meta["level"] == "Level 2" and examples[0].meta["type"] == "Algebra"
    assert examples[3].answer is None
    assert report.reasons() == {"missing question": 1}

    kept, _ = load_examples(path, strip_instruction=False)
    assert kept[0].question.endswith("output the final answer within \\boxed{}.")
    _, report = load_examples(path, require_answers=True)
    assert report.reasons() == {"missing question": 1, "missing answer": 1}
    assert len(load_examples(path, limit=2)[0]) == 2


def test_datasets_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"problem": f"q{i}?", "answer": str(i)} for i in range(4)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert [e.answer for e in load_examples(tmp_path / "saved")[0]] == ["0", "1", "2", "3"]
    assert len(load_examples(tmp_path / "saved", split="test")[0]) == 1
    with pytest.raises(ValueError, match="no split"):
        load_examples(tmp_path / "saved", split="validation")
    dd["train"].save_to_disk(str(tmp_path / "single"))
    assert len(load_examples(tmp_path / "single")[0]) == 4

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert [e.question for e in load_examples(folder)[0]] == ["q0?", "q1?", "q2?", "q3?"]


def test_missing_sources_and_bad_formats(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_examples("gainrl-test-org/surely-not-a-cached-dataset")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_examples(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="cannot tell the data format"):
        load_examples(write_json(tmp_path / "x.json", [{"text": "hello"}]))
    with pytest.raises(ValueError, match="fmt"):
        load_examples(write_json(tmp_path / "y.json", GAINRL_ROWS), fmt="csv")


def test_format_from_the_first_usable_row(tmp_path):
    """Malformed first rows (no known column, or a verl-looking row without a question) do not decide the format:
    they are reported and skipped like any other malformed row."""
    good = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 3+3?", "answer": "6"}]
    for bad in ({"answer": "5"}, {"prompt": None, "answer": "1"}):
        examples, report = load_examples(write_json(tmp_path / "d.json", [bad, *good]))
        assert report.fmt == "gainrl" and [e.index for e in examples] == [1, 2]
        assert report.n_skipped == 1
        with pytest.raises(ValueError, match="row 0"):
            load_examples(tmp_path / "d.json", strict=True)


def test_answer_helpers():
    assert normalize_reference_answer("  72 ") == "72"
    assert normalize_reference_answer("text\n#### 1,234,567") == "1234567"
    assert normalize_reference_answer("\\frac{1,2}{3}") == "\\frac{1,2}{3}"  # LaTeX untouched
    assert normalize_reference_answer(float("nan")) is None
    assert normalize_reference_answer(3) == "3" and normalize_reference_answer(2.5) == "2.5"
    assert normalize_reference_answer("") is None and normalize_reference_answer(None) is None
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None


@pytest.mark.skipif(not (SHARED / "gsm8k_train.parquet").exists(), reason="shared data absent")
def test_shared_gsm8k_and_math():
    gsm, report = load_examples(SHARED / "gsm8k_train.parquet", require_answers=True, limit=500)
    assert report.n_skipped == 0 and len(gsm) == 500
    assert all(e.answer.lstrip("-").replace(".", "", 1).isdigit() for e in gsm)
    assert not any("####" in e.question or "step by step" in e.question for e in gsm)
    math_path = SHARED / "math_train.parquet"
    if math_path.exists():
        ex, report = load_examples(math_path, require_answers=True)
        assert report.reasons() in ({}, {"missing answer": report.n_skipped})
        assert all(str(e.meta["level"]).startswith("Level") for e in ex)
        assert not any(e.question.endswith("within \\boxed{}.") for e in ex)
