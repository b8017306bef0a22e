"""`torchrun --nproc-per-node 2 -m gainrl score` on CPU (gloo): the merged outputs equal a one-process run's, byte for
byte, also when a launch with another number of ranks resumes a partly finished run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from tiny_models import save_tiny_chat_model  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "score_small.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_model_dist"), seed=5)


def score(out: Path, model_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    """Run `gainrl score` in fresh processes: plain for ``nproc == 1``, else under torchrun."""
    args = ["-m", "gainrl", "score", "--data", str(FIXTURE), "--out", str(out), "--model", str(model_dir),
            "--no-progress", "--max-batch", "1"]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("score1") / "run"
    score(out, model_dir, 1)
    return out


def assert_same_outputs(a: Path, b: Path) -> None:
    assert (a / "scores.jsonl").read_bytes() == (b / "scores.jsonl").read_bytes()
    assert torch.equal(torch.load(a / "order.pt"), torch.load(b / "order.pt"))


def test_two_ranks_equal_one_process(single, model_dir, tmp_path):
    out = tmp_path / "run2"
    proc = score(out, model_dir, 2)
    assert_same_outputs(single, out)
    partials = sorted(p.name for p in out.glob("scores.partial.rank*.jsonl"))
    assert partials == ["scores.partial.rank0.jsonl", "scores.partial.rank1.jsonl"]
    for p in out.glob("scores.partial.rank*.jsonl"):
        assert p.read_text(encoding="utf-8").strip(), f"{p.name}: this rank scored nothing"
    summary_line = [line for line in proc.stderr.splitlines() if "scored," in line]
    assert len(summary_line) == 1, proc.stderr[-2000:]  # only rank 0 reports


def test_two_ranks_resume_a_one_process_run(single, model_dir, tmp_path):
    """A run cut short after two batches, resumed by a 2-rank launch: only the rest is scored, and the result is the
    same."""
    out = tmp_path / "resume"
    out.mkdir()
    shutil.copy(single / "score_run.json", out / "score_run.json")
    lines = (single / "scores.partial.rank0.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > 4
    (out / "scores.partial.rank0.jsonl").write_text("".join(lines[:2]), encoding="utf-8")
    score(out, model_dir, 2)
    assert_same_outputs(single, out)
    n_scored = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in out.glob("scores.partial.rank*.jsonl"))
    assert n_scored == len(lines)  # no batch scored twice
