"""`gainrl score` end to end on a tiny random model saved to disk and a hand-written fixture with malformed rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import gainrl.score as score_mod  # noqa: E402
from gainrl.cli import main  # noqa: E402
from gainrl.score import correlations, descending_order, plan_batches, shared_prefix_length  # noqa: E402
from gainrl_kernels.naive import naive_angle_metrics  # noqa: E402
from gainrl_kernels.probe import find_decoder_layers  # noqa: E402
from tiny_models import save_tiny_chat_model  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "score_small.jsonl"
VALID = [0, 1, 3, 4, 5, 7, 9]  # rows with a question
SKIPPED = {2: "missing question", 6: "invalid JSON", 8: "missing question"}
ROW_KEYS = ["index", "score", "c_intra", "c_inter", "n_tokens", "seg_offsets", "prompt_text"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls run on one thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_model"), seed=3)


def run_cli(out: Path, model_dir: Path, *extra: str) -> int:
    args = ["score", "--data", str(FIXTURE), "--out", str(out), "--model", str(model_dir), "--no-progress",
            "--max-batch", "2", *extra]
    return main(args)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("score") / "run"
    assert run_cli(out, model_dir) == 0
    return out


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]


def test_outputs_format(finished):
    rows = read_rows(finished)
    assert [r["index"] for r in rows] == VALID
    assert all(list(r) == ROW_KEYS for r in rows)
    for r in rows:
        o = r["seg_offsets"]
        assert o[0] == 0 < o[1] < o[2] <= r["n_tokens"]
        assert r["prompt_text"].endswith("<|im_start|>assistant\n")
    one_token = next(r for r in rows if r["index"] == 4)  # the question "7": one Q token, no pairs
    assert one_token["score"] is None and one_token["c_intra"] is None and one_token["c_inter"] is not None
    defined = [r for r in rows if r["score"] is not None]
    assert len(defined) == len(rows) - 1
    for r in defined:
        assert math.isclose(r["score"], r["c_intra"] + r["c_inter"], rel_tol=1e-5, abs_tol=1e-6)

    order = torch.load(finished / "order.pt")
    assert order.dtype == torch.int64 and sorted(order.tolist()) == VALID
    by_score = sorted(defined, key=lambda r: -r["score"])
    assert order.tolist() == [r["index"] for r in by_score] + [4]

    summary = json.loads((finished / "summary.json").read_text())
    assert {s["index"]: s["reason"] for s in summary["skipped"]}.keys() == SKIPPED.keys()
    assert all(SKIPPED[s["index"]] in s["reason"] for s in summary["skipped"])
    assert summary["n_scored"] == len(VALID) and summary["n_rows"] == 10
    assert summary["score"]["n_undefined"] == 1
    assert set(summary["correlation"]) == {"n_tokens", "question_tokens", "level"}
    assert -1 <= summary["correlation"]["level"]["spearman"] <= 1
    assert summary["shared_prefix_tokens"] > 16 and summary["batches"] >= 2
    assert (finished / "score_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(finished.glob("*.tmp"))


def test_scores_recomputed_from_prompt_text(finished, model_dir):
    """Independent recomputation: tokenize prompt_text, full forward, hook up_proj, float64 cosine matrices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    got = []
    up = find_decoder_layers(model)[-1].mlp.up_proj
    handle = up.register_forward_pre_hook(lambda m, a: got.append(a[0][0].detach()))
    try:
        for r in read_rows(finished):
            ids = tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
            assert len(ids) == r["n_tokens"]
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            ref = naive_angle_metrics(got[-1], torch.tensor([0, len(ids)]), torch.tensor([r["seg_offsets"]]))
            if r["score"] is None:
                assert math.isnan(ref["score"][0])
            else:
                assert r["score"] == pytest.approx(float(ref["score"][0]), rel=1e-5, abs=1e-6)
                assert r["c_intra"] == pytest.approx(float(ref["intra"][0, 1]), rel=1e-5, abs=1e-6)
                assert r["c_inter"] == pytest.approx(float(ref["inter"][0, 1, 0]), rel=1e-5, abs=1e-6)
    finally:
        handle.remove()


def test_without_prefix_cache_same_scores(finished, model_dir, tmp_path):
    out = tmp_path / "full"
    assert run_cli(out, model_dir, "--no-prefix-cache", "--parquet") == 0
    a, b = read_rows(finished), read_rows(out)
    assert [r["index"] for r in a] == [r["index"] for r in b]
    for x, y in zip(a, b):
        assert x["prompt_text"] == y["prompt_text"] and x["seg_offsets"] == y["seg_offsets"]
        assert (x["score"] is None) == (y["score"] is None)
        if x["score"] is not None:
            assert x["score"] == pytest.approx(y["score"], rel=1e-5, abs=1e-6)
    assert json.loads((out / "summary.json").read_text())["shared_prefix_tokens"] == 0
    import pyarrow.parquet as pq

    assert pq.read_table(out / "scores.parquet").column_names == ROW_KEYS


@pytest.mark.parametrize("prefix_cache,norms", [(True, False), (False, False), (True, True)])
def test_fused_probe_same_scores(finished, model_dir, tmp_path, monkeypatch, prefix_cache, norms):
    """--angle-fused on: the fused RMSNorm + angle kernel in place of the layer's norm gives the hook's scores (also
    with every norm on our kernels, --fused-norms)."""
    import gainrl_kernels.rmsnorm_angle as R
    from gainrl_kernels.validate import triton_interpreting

    if not triton_interpreting():
        pytest.skip("the fused kernel on this CPU model needs TRITON_INTERPRET=1")
    calls = {"stats": 0, "plain": 0}
    real = R.rmsnorm_angle

    def counted(x, weight, eps=1e-6, cu_seqlens=None, *args, **kw):
        calls["plain" if cu_seqlens is None else "stats"] += 1
        return real(x, weight, eps, cu_seqlens, *args, **kw)

    monkeypatch.setattr(R, "rmsnorm_angle", counted)  # what FusedRMSNormAngle.forward calls
    out = tmp_path / "fused"
    extra = ([] if prefix_cache else ["--no-prefix-cache"]) + (["--fused-norms"] if norms else [])
    assert run_cli(out, model_dir, "--angle-fused", "on", *extra) == 0
    assert calls["stats"] >= 1  # the statistics came from the fused norm
    assert (calls["plain"] > 0) == norms  # the other norms ran our kernel only with --fused-norms
    a, b = read_rows(finished), read_rows(out)
    assert [r["index"] for r in a] == [r["index"] for r in b]
    for x, y in zip(a, b):
        assert (x["score"] is None) == (y["score"] is None)
        if x["score"] is not None:
            assert x["score"] == pytest.approx(y["score"], rel=1e-5, abs=1e-6)


def test_resume_after_interruption_is_identical(finished, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    n_batches = json.loads((finished / "summary.json").read_text())["batches"]
    assert n_batches >= 3

    def interrupt(batch):
        if batch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(score_mod, "_after_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_cli(out, model_dir)
    assert not (out / "scores.jsonl").exists() and not (out / "order.pt").exists()
    partial = out / "scores.partial.rank0.jsonl"
    assert len(partial.read_text().splitlines()) == 2
    with partial.open("a") as f:  # a record cut short by the interruption: dropped, its batch recomputed
        f.write('{"batch": 2, "rows": [[1, 0.5')

    calls = []
    real = score_mod.score_batch
    monkeypatch.setattr(score_mod, "_after_batch", lambda b: None)
    monkeypatch.setattr(score_mod, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_cli(out, model_dir) == 0
    assert len(calls) == n_batches - 2, "finished batches were recomputed"
    assert (out / "scores.jsonl").read_bytes() == (finished / "scores.jsonl").read_bytes()
    assert torch.equal(torch.load(out / "order.pt"), torch.load(finished / "order.pt"))

    calls.clear()  # a rerun of a finished run recomputes nothing and rewrites the same outputs
    assert run_cli(out, model_dir) == 0
    assert calls == []
    assert (out / "scores.jsonl").read_bytes() == (finished / "scores.jsonl").read_bytes()


def test_resume_keeps_a_complete_record_without_its_newline(finished, model_dir, tmp_path, monkeypatch):
    """Interrupted between a record and its newline: the record counts as done and stays on disk (a rerun writes
    the outputs instead of skipping that batch and never writing them)."""
    out = tmp_path / "run"
    monkeypatch.setattr(score_mod, "_after_batch", lambda b: (_ for _ in ()).throw(KeyboardInterrupt) if b == 1
                        else None)
    with pytest.raises(KeyboardInterrupt):
        run_cli(out, model_dir)
    partial = out / "scores.partial.rank0.jsonl"
    partial.write_bytes(partial.read_bytes().rstrip(b"\n"))
    monkeypatch.setattr(score_mod, "_after_batch", lambda b: None)
    assert run_cli(out, model_dir) == 0
    assert (out / "scores.jsonl").read_bytes() == (finished / "scores.jsonl").read_bytes()


def test_changed_settings_strict_and_sharding(finished, model_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(out, model_dir, "--limit", "3") == 0
    with pytest.raises(ValueError, match="other settings"):
        run_cli(out, model_dir, "--limit", "4")
    assert run_cli(out, model_dir, "--limit", "4", "--overwrite") == 0
    assert [r["index"] for r in read_rows(out)] == VALID[:4]
    with pytest.raises(ValueError, match="row 2"):
        run_cli(tmp_path / "strict", model_dir, "--strict")
    from gainrl.cli import cli  # the console script: one line, exit status 2

    assert cli(["score", "--data", str(FIXTURE), "--out", str(tmp_path / "strict"), "--model", str(model_dir),
                "--strict", "--no-progress"]) == 2
    # two shards run one after the other: the second one writes the merged outputs
    shard = tmp_path / "shard"
    assert run_cli(shard, model_dir, "--rank", "0", "--world-size", "2") == 0
    assert not (shard / "scores.jsonl").exists()
    assert run_cli(shard, model_dir, "--rank", "1", "--world-size", "2") == 0
    assert (shard / "scores.jsonl").read_bytes() == (finished / "scores.jsonl").read_bytes()
    # only rank 0 may start a sharded run afresh: another rank would count the partials rank 0 deletes as done
    with pytest.raises(ValueError, match="--overwrite: only rank 0"):
        run_cli(shard, model_dir, "--rank", "1", "--world-size", "2", "--overwrite")


def test_weights_replaced_in_place_start_a_new_run(model_dir, tmp_path):
    import shutil

    model = shutil.copytree(model_dir, tmp_path / "model")
    before = score_mod._model_identity(str(model))
    copy = score_mod._model_identity(str(shutil.copytree(model, tmp_path / "copy")))  # e.g. on another node
    assert copy["weights_sha256_sampled"] == before["weights_sha256_sampled"] and copy["path"] != before["path"]
    weights = next(p for p in model.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, other bytes
    weights.write_bytes(bytes(data))
    assert score_mod._model_identity(str(model))["weights_sha256_sampled"] != before["weights_sha256_sampled"]


def test_device_per_torchrun_rank(monkeypatch):
    from gainrl.models import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 3)  # not every rank on the current device
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 0)


def test_helpers():
    assert plan_batches([5, 9, 5, 2, 9], batch_tokens=18, max_batch=4) == [[1, 4], [0, 2, 3]]
    assert plan_batches([30, 2], batch_tokens=10, max_batch=4) == [[0], [1]]
    assert plan_batches([3, 3, 3], batch_tokens=100, max_batch=2) == [[0, 1], [2]]
    assert descending_order([4, 1, 2, 3], [0.5, None, 0.9, 0.5]) == [2, 3, 4, 1]
    assert descending_order([0, 1], [float("nan"), -1.0]) == [1, 0]
    c = correlations([1, 2, 3, 4, None], [10, 20, 30, 45, 1])
    assert c["spearman"] == pytest.approx(1.0) and c["n"] == 4 and 0.9 < c["pearson"] < 1
    assert correlations([1, 1, 1], [1, 2, 3]) is None
    item = score_mod.Item
    items = [item(0, [1, 2, 3, 4, 9], [0, 4, 5], ""), item(1, [1, 2, 3, 8, 9, 9], [0, 4, 6], "")]
    assert shared_prefix_length(items) == 3
    assert score_mod.parse_level({"level": "Level 4"}) == 4.0
    assert score_mod.parse_level({"extra_info": {"level": 2}}) == 2.0
    assert score_mod.parse_level({"level": "hard"}) is None
    row = lambda score, intra, inter, seg: dict(index=0, score=score, c_intra=intra, c_inter=inter,  # noqa: E731
                                                seg_offsets=seg)
    why = score_mod.undefined_reason
    assert why(row(0.5, 0.3, 0.2, [0, 4, 9])) is None
    assert why(row(None, None, 0.2, [0, 4, 5])) == "question_under_2_tokens"
    assert why(row(None, 0.3, None, [0, 0, 5])) == "empty_prefix"
    assert why(row(None, None, None, [0, 4, 9])) == "non_finite_hidden_states"
    assert why(row(None, None, None, [0, 4, 5])) == "non_finite_hidden_states"  # one token, but no C_inter either


def test_gguf_cache_key_and_home_paths(tmp_path, monkeypatch):
    """Two GGUF files of one name and size (e.g. two checkpoints' exports) get their own cache folders; ~ expands."""
    from gainrl.models import gguf_cache_dir, load_model_and_tokenizer

    monkeypatch.setenv("GAINRL_CACHE", str(tmp_path / "cache"))
    files = []
    for step in (100, 200):
        (tmp_path / f"ckpt-{step}").mkdir()
        files.append(tmp_path / f"ckpt-{step}" / "model.Q4_1.gguf")
        files[-1].write_bytes(bytes([step % 256]) * 1000)
    assert gguf_cache_dir(files[0]) != gguf_cache_dir(files[1])
    assert gguf_cache_dir(files[0]) == gguf_cache_dir(files[0])
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no such GGUF file: {tmp_path}/missing.gguf"):
        load_model_and_tokenizer("~/missing.gguf")


def test_unreadable_gguf_cache_falls_back_to_the_gguf(tmp_path, monkeypatch):
    import gainrl.models as models
    from tiny_models import chat_tokenizer, tiny_lm

    monkeypatch.setenv("GAINRL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * 100)
    cache = models.gguf_cache_dir(gguf)
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{ truncated")
    calls = []
    monkeypatch.setattr(models, "_load_gguf_and_cache",
                        lambda path, cache_dir: calls.append(cache_dir) or (tiny_lm("llama"), chat_tokenizer()))
    lm, _ = models.load_model_and_tokenizer(str(gguf), dtype="fp32", device="cpu")
    assert calls == [None] and not lm.training  # read from the GGUF, the broken cache left alone
