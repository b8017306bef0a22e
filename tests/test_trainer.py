"""gainrl train end to end on a tiny random model: metrics, resume equality, atomic checkpoints, bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from gainrl import checkpoint as ckpt_mod  # noqa: E402
from gainrl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from gainrl.config import DEMO_DEFAULTS, apply_resume_overrides, build_config, load_run_config, load_yaml  # noqa: E402
from gainrl.rewards import REWARDS, register_reward  # noqa: E402
from gainrl.trainer import METRIC_FIELDS, TrainDataError, Trainer, lr_at, read_jsonl  # noqa: E402
from tiny_models import chat_tokenizer, tiny_lm  # noqa: E402

TIMING_FIELDS = {"tokens_per_s", "gen_s", "step_s", "time"}

if "test_varied" not in REWARDS:

    @register_reward("test_varied")
    def varied_reward(completions, answers):
        """Varies between random completions (their length mod 5), so that advantages are non-zero."""
        return [(len(c) % 5) / 4 for c in completions]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls run on one thread


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


def make_cfg(out: Path, **over):
    values = dict(
        out=str(out), synthetic_size=40, eval_size=4, eval_max_new_tokens=4, prompts_per_epoch=4, batch_prompts=2,
        group_size=3, max_new_tokens=6, micro_batch_size=4, lr=1e-2, sigma=5.0, mu_n=5.0, mu_adj_max=10.0,
        max_steps=2, progress=False, save_every=1, threads=1, beta=0.05, temperature=1.0,
        rewards={"accuracy": 1.0, "test_varied": 1.0},
    )
    values.update(over)
    return build_config({}, values)


def run(cfg, tokenizer, **kw):
    trainer = Trainer(cfg, model=tiny_lm(seed=0), tokenizer=tokenizer, **kw)
    return trainer, trainer.train()


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_two_step_run_writes_finite_metrics(tmp_path, tokenizer):
    trainer, summary = run(make_cfg(tmp_path / "run"), tokenizer)
    out = tmp_path / "run"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in METRIC_FIELDS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert -1.0 <= r["angle"] <= 1.0
        assert r["kl"] >= 0.0
    assert rows[0]["kl"] == 0.0  # first step: the policy still is the reference
    assert rows[1]["kl"] > 0.0
    assert rows[-1]["epoch"] == 1 and "epoch_accuracy" in rows[-1] and "mu_next" in rows[-1]  # 4 prompts / 2 = 2 steps
    epochs = read_jsonl(out / "epochs.jsonl")
    assert len(epochs) == 1 and len(epochs[0]["prompts"]) == 4
    assert epochs[0]["mu_next"] == rows[-1]["mu_next"]
    # the μ update saw the epoch's accuracy in [0, 1] and mean C_causal
    from gainrl.sampler import MuUpdateConfig, mu_update

    expect = mu_update(0.0, epochs[0]["accuracy"], epochs[0]["angle"], trainer.sampler.n_items,
                       MuUpdateConfig(5.0, 2.0, 0.5, 0.0, 10.0))
    assert epochs[0]["mu_next"] == pytest.approx(expect)
    assert (out / "config.yaml").is_file() and load_run_config(out).max_steps == 2
    assert len(read_jsonl(out / "eval.jsonl")) == 2  # before and after
    assert latest_checkpoint(out).name == "step-000002"
    assert (out / "scores" / "order.pt").is_file()  # scored on the fly
    for name in ("accuracy_reward.png", "mu.png", "angle_accuracy.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert summary["steps"] == 2
    info = json.loads((out / "run_info.json").read_text())
    assert info["n_train"] + info["n_eval"] == 40


def test_resume_is_bit_identical(tmp_path, tokenizer):
    cfg_a = make_cfg(tmp_path / "a", max_steps=3)
    trainer_a, _ = run(cfg_a, tokenizer)

    class Interrupt(Exception):
        pass

    def stop_after_first(trainer, row):
        if trainer.step == 1:
            raise Interrupt

    cfg_b = make_cfg(tmp_path / "b", max_steps=3)
    with pytest.raises(Interrupt):
        run(cfg_b, tokenizer, callbacks=[stop_after_first])
    assert latest_checkpoint(tmp_path / "b").name == "step-000001"
    # a torn metrics line from the interrupted run is dropped on resume
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "trunc')
    resumed_cfg = apply_resume_overrides(load_run_config(tmp_path / "b"), {})
    trainer_b, _ = run(resumed_cfg, tokenizer, resume=tmp_path / "b")

    rows_a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    rows_b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    assert strip_timing(rows_a) == strip_timing(rows_b)
    wa, wb = weights(trainer_a.model), weights(trainer_b.model)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert trainer_a.sampler.state_dict() == trainer_b.sampler.state_dict()
    ea, eb = read_jsonl(tmp_path / "a" / "epochs.jsonl"), read_jsonl(tmp_path / "b" / "epochs.jsonl")
    assert ea == eb and [e["mu_next"] for e in ea]
    oa = trainer_a.optimizer.state_dict()["state"]
    ob = trainer_b.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)


def test_checkpoint_crash_keeps_previous(tmp_path, tokenizer, monkeypatch):
    model = tiny_lm(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, tokenizer=tokenizer)
    before = weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(optimizer, folder):
        (folder / "optimizer.pt").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "_write_optimizer", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh = tiny_lm(seed=2)
    state, rng = load_checkpoint(latest_checkpoint(tmp_path), fresh, torch.optim.AdamW(fresh.parameters()))
    assert state == {"step": 1} and "torch" in rng
    assert all(torch.equal(before[k], v) for k, v in weights(fresh).items())
    # a crash after the rename but before `latest` moved: the newest complete folder is still found
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3})
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step-000003"
    # a half-written folder (no COMPLETE marker) is never picked
    broken = tmp_path / "checkpoints" / "step-000004"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path).name == "step-000003"


def test_order_file_not_matching_data(tmp_path, tokenizer):
    scores = tmp_path / "scores"
    scores.mkdir()
    torch.save(torch.tensor([0, 1, 2, 999], dtype=torch.int64), scores / "order.pt")
    with pytest.raises(TrainDataError, match="does not match the data"):
        run(make_cfg(tmp_path / "run", scores=str(scores)), tokenizer)
    torch.save(torch.tensor([0, 1, 2], dtype=torch.int64), scores / "order.pt")  # ranks 3 of ~36
    with pytest.raises(TrainDataError, match="does not match the data"):
        run(make_cfg(tmp_path / "run", scores=str(scores)), tokenizer)
    torch.save(torch.tensor([0, 0, 1]), scores / "order.pt")
    with pytest.raises(TrainDataError, match="more than once"):
        run(make_cfg(tmp_path / "run", scores=str(scores)), tokenizer)
    with pytest.raises(TrainDataError, match="not found"):
        run(make_cfg(tmp_path / "run", scores=str(tmp_path / "nowhere")), tokenizer)


def test_order_file_from_scores_is_used(tmp_path, tokenizer):
    scores = tmp_path / "scores"
    scores.mkdir()
    order = list(range(39, -1, -1))  # every row of the synthetic set (held-out ones are dropped from it)
    torch.save(torch.tensor(order, dtype=torch.int64), scores / "order.pt")
    trainer, _ = run(make_cfg(tmp_path / "run", scores=str(scores), max_steps=1, eval_size=2), tokenizer)
    ranked = [it.index for it in trainer.bundle.ranked]
    assert ranked == [i for i in order if i in set(ranked)] and len(ranked) == 38


def test_long_prompts_are_counted_and_skipped(tmp_path, tokenizer):
    from gainrl.prompts import render_prompt
    from gainrl.synthetic import make_arithmetic_dataset
    from gainrl.trainer import prompt_config_of

    pcfg = prompt_config_of(make_cfg(tmp_path))
    lengths = sorted(render_prompt(tokenizer, ex, pcfg).n_tokens
                     for ex in make_arithmetic_dataset(40, seed=0, levels=[1, 2, 5]))
    limit = lengths[len(lengths) // 2]  # level-5 word problems are much longer than level 1/2 questions
    cfg = make_cfg(tmp_path / "run", synthetic_levels=[1, 2, 5], max_prompt_len=limit, max_steps=1, eval_size=2)
    trainer, _ = run(cfg, tokenizer)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    skipped = info["prompts_skipped"]["prompt_too_long"] + info["eval_prompts_skipped"]["prompt_too_long"]
    assert skipped == sum(n > limit for n in lengths) > 0
    assert info["n_train"] + info["n_eval"] + skipped == 40
    assert all(it.n_tokens <= limit for it in trainer.bundle.ranked)


def test_bad_data_rows_and_model_without_probe_modules(tmp_path, tokenizer):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(12)]
    rows += [{"problem": "no answer here"}, {"answer": "3"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    cfg = make_cfg(tmp_path / "run", data=str(data), eval_size=2, max_steps=1, prompt="bare", sampler="uniform")
    trainer, _ = run(cfg, tokenizer)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert sum(info["rows_skipped"].values()) == 3 and info["n_train"] == 10
    with pytest.raises(ValueError, match="already holds a training run"):
        run(cfg, tokenizer)

    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no decoder layers"):
        Trainer(make_cfg(tmp_path / "x"), model=NoLayers(), tokenizer=tokenizer).train()


def test_config_yaml_cli_precedence_and_resume_rules(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3.0e-6\ngroup-size: 4\nrewards: {accuracy: 1.0, format: 0.2}\n")
    values = load_yaml(y)
    cfg = build_config(values, {"group_size": "6"})
    assert cfg.lr == 3e-6 and cfg.group_size == 6 and cfg.rewards == {"accuracy": 1.0, "format": 0.2}
    assert cfg.prompts_per_epoch == DEMO_DEFAULTS["prompts_per_epoch"]  # no data: the embedded demo values
    assert build_config({}, {"data": "x.jsonl"}).prompts_per_epoch == 512  # with data: the paper-scale defaults
    y.write_text("lrr: 1\n")
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        load_yaml(y)
    with pytest.raises(ValueError, match="group_size"):
        build_config({}, {"group_size": 1})
    with pytest.raises(ValueError, match="cannot change when resuming"):
        apply_resume_overrides(cfg, {"lr": 1.0})
    assert apply_resume_overrides(cfg, {"max_steps": "9"}).max_steps == 9


def test_lr_schedule():
    cfg = build_config({}, {"lr": 1.0, "warmup_steps": 2, "lr_schedule": "cosine"})
    assert [lr_at(cfg, u, 6) for u in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi * 0.25)), 0.5, 0.5 * (1 + math.cos(math.pi * 0.75))]
    )


def reference_causal(model, input_ids: list[int], layer: int = -1) -> float:
    """C_causal over a whole sequence from the hooked input of the last layer's MLP, in float64."""
    from gainrl_kernels.probe import find_decoder_layers

    captured = []
    handle = find_decoder_layers(model)[layer].mlp.register_forward_pre_hook(
        lambda mod, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(torch.tensor([input_ids]))
    finally:
        handle.remove()
    u = torch.nn.functional.normalize(captured[0][0].double(), dim=-1)
    n = u.shape[0]
    s = u.sum(0)
    return float((s @ s - (u * u).sum()) / (n * (n - 1)))


@pytest.mark.parametrize("gc,fused", [(False, "off"), (True, "off"), (True, "on")])
def test_training_forward_angle_is_c_causal_over_prompt_and_response(tmp_path, tokenizer, gc, fused):
    import copy

    from gainrl_kernels.patching import revert_fused_rmsnorm_angle
    from gainrl_kernels.validate import triton_interpreting

    if fused == "on" and not (triton_interpreting() or torch.cuda.is_available()):
        pytest.skip("the fused kernel needs a GPU or TRITON_INTERPRET=1")
    cfg = make_cfg(tmp_path / "run", micro_batch_size=2, gradient_checkpointing=gc, beta=0.0, eval_size=2,
                   angle_fused=fused)
    trainer = Trainer(cfg, model=tiny_lm(seed=0), tokenizer=tokenizer)
    trainer._setup()
    assert (trainer.probe.fused is not None) == (fused == "on")
    before = copy.deepcopy(trainer.model)
    revert_fused_rmsnorm_angle(before)  # the deep copy carries the probe's fused norm (its original too) ...
    for h in list(before.model.layers[-1].mlp._forward_pre_hooks):  # ... and its hooks
        del before.model.layers[-1].mlp._forward_pre_hooks[h]
    items = trainer.bundle.ranked[:2]
    row = trainer.train_step(items)
    ro = trainer.last_rollouts
    assert len(trainer.last_angles) == len(ro) == 2 * cfg.group_size
    for p, c, a in zip(ro.prompt_ids, ro.completion_ids, trainer.last_angles):
        assert a == pytest.approx(reference_causal(before, p + c), abs=2e-5)
    assert row["angle"] == pytest.approx(sum(trainer.last_angles) / len(trainer.last_angles), abs=1e-6)
    assert trainer.probe.captures == math.ceil(len(ro) / 2)  # once per micro-batch: no capture in recomputation
    trainer.probe.remove()


@pytest.mark.parametrize("variant", [
    {"precision": "bf16"},
    {"num_iterations": 2, "loss_agg": "sequence", "scale_rewards": "none", "epsilon_high": 0.28, "sampler": "ordered",
     "order_by": "length", "lr_schedule": "cosine", "warmup_steps": 1, "train_layers": 1, "lr": 0.1},
])
def test_step_variants(tmp_path, tokenizer, variant):
    trainer, _ = run(make_cfg(tmp_path / "run", max_steps=1, eval_size=2, **variant), tokenizer)
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert all(math.isfinite(row[k]) for k in METRIC_FIELDS)
    if variant.get("num_iterations") == 2:
        assert row["clip_frac"] > 0  # lr 0.1 moves the ratio out of [1 - eps, 1 + eps_high] on the second update
        assert trainer.info["trainable_params"] < trainer.info["total_params"]


def test_fused_norms_and_fused_probe_step(tmp_path, tokenizer):
    """--fused-norms (every norm on our kernels) with --angle-fused on: a finite step, the count in run_info."""
    from gainrl_kernels.rmsnorm_angle import FusedRMSNormAngle
    from gainrl_kernels.validate import triton_interpreting

    if not (triton_interpreting() or torch.cuda.is_available()):
        pytest.skip("the fused kernels need a GPU or TRITON_INTERPRET=1")
    trainer, _ = run(make_cfg(tmp_path / "run", max_steps=1, eval_size=2, fused_norms=True, angle_fused="on"),
                     tokenizer)
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert all(math.isfinite(row[k]) for k in METRIC_FIELDS)
    assert trainer.info["fused_norms"] == 5  # 2 layers x (input, post-attention) + the final norm
    # the probe measured through the norm --fused-norms had fused, and left it fused when it was removed
    assert isinstance(trainer.model.model.layers[-1].post_attention_layernorm, FusedRMSNormAngle)
    assert trainer.probe.captures >= 1 and math.isfinite(row["angle"])
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["fused_norms"] == 5


def test_rollout_prefix_sharing_and_padding(tokenizer):
    from gainrl.rollout import HFRolloutEngine, cut_completion

    model = tiny_lm(seed=3)
    prompts = [tokenizer("What is 2+2? user", add_special_tokens=False)["input_ids"],
               tokenizer("Compute 12", add_special_tokens=False)["input_ids"]]
    outs = []
    for share in (False, True):
        engine = HFRolloutEngine(model, tokenizer, max_new_tokens=8, share_prefix=share)
        torch.manual_seed(0)
        outs.append(engine.generate(prompts, 3))
    assert outs[0].completion_ids == outs[1].completion_ids
    ro = outs[1]
    assert ro.prompt_index == [0, 0, 0, 1, 1, 1] and ro.prompt_ids[3] == prompts[1]
    b = ro.padded(tokenizer.pad_token_id)
    assert b.input_ids.shape[1] == b.prompt_width + b.completion_mask.shape[1]
    for i in range(len(ro)):
        p, c = ro.prompt_ids[i], ro.completion_ids[i]
        real = b.input_ids[i][b.attention_mask[i].bool()].tolist()
        assert real == p + c
        assert b.completion_ids[i, : len(c)].tolist() == c and b.completion_mask[i].sum() == len(c)
        assert b.position_ids[i][b.attention_mask[i].bool()].tolist() == list(range(len(p) + len(c)))
    assert cut_completion([5, 6, 1, 7], [1]) == ([5, 6, 1], True)
    assert cut_completion([5, 6], [1]) == ([5, 6], False)
    greedy = HFRolloutEngine(model, tokenizer, max_new_tokens=5).generate(prompts, 2, greedy=True)
    assert greedy.completion_ids[0] == greedy.completion_ids[1]


def _peaked_lm(seed: int = 0):
    """A tiny LM with a peaked next-token distribution (repeats its argmax tokens, so penalties would bite)."""
    model = tiny_lm(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model


def _argmax_decode(model, prompt: list[int], steps: int, eos: list[int]) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([prompt + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
    return out


@pytest.mark.parametrize("share", [False, True])
def test_rollouts_ignore_the_model_generation_config(tokenizer, share):
    """Samples come from softmax(logits / T) and greedy is the argmax, whatever the model's generation_config says
    (repetition penalty, n-gram ban, minimum length, ...); the model's config is left as it was."""
    from gainrl.rollout import HFRolloutEngine

    plain, tuned = _peaked_lm(), _peaked_lm()
    loop = [5, 6, 7]  # a prompt whose argmax next token already occurs in it: penalties and n-gram bans bite
    while (nxt := _argmax_decode(plain, loop, 1, [])[0]) not in loop:
        loop.append(nxt)
    prompts = [loop, tokenizer("Compute 12", add_special_tokens=False)["input_ids"]]
    gc = tuned.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 1.5, 1, 6
    gc.suppress_tokens, gc.top_k, gc.top_p, gc.temperature = [tokenizer.eos_token_id], 5, 0.5, 0.3
    saved = gc.to_dict()
    samples, greedy = [], []
    for model in (plain, tuned):
        engine = HFRolloutEngine(model, tokenizer, max_new_tokens=8, temperature=1.0, share_prefix=share)
        torch.manual_seed(0)
        samples.append(engine.generate(prompts, 4).completion_ids)
        greedy.append(engine.generate(prompts, 1, greedy=True).completion_ids)
    assert samples[0] == samples[1]
    assert greedy[0] == greedy[1] == [_argmax_decode(plain, p, 8, engine.eos) for p in prompts]
    with torch.no_grad():  # the model's own config would have changed the greedy continuation
        leaky = tuned.generate(input_ids=torch.tensor(prompts[:1]), max_new_tokens=8, pad_token_id=engine.pad_id)
    assert leaky[0, len(loop):].tolist() != greedy[0][0]
    assert tuned.generation_config is gc and gc.to_dict() == saved


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_is_an_error_naming_function_and_sample(tmp_path, bad):
    trainer = Trainer(make_cfg(tmp_path / "run"))  # no setup needed for the reward computation

    def flaky(completions, answers):
        return [0.5, 1.0, bad][: len(completions)]

    trainer.reward_fns = {"accuracy": (lambda c, a: [0.0] * len(c), 1.0), "flaky": (flaky, 0.5)}
    assert trainer._rewards(["a", "b"], ["1", "2"]) == ([0.25, 0.5], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"reward 'flaky' returned -?(nan|inf) for sample 2 \(completion 'c'\)"):
        trainer._rewards(["a", "b", "c"], ["1", "2", "3"])


def test_eval_data_of_a_multi_split_dataset_is_read_from_its_held_out_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    from gainrl.trainer import load_train_examples

    rows = [{"problem": f"q{i}?", "answer": str(i)} for i in range(6)]

    def saved(name: str, **splits: slice) -> str:
        dd = datasets.DatasetDict({k: datasets.Dataset.from_list(rows[v]) for k, v in splits.items()})
        dd.save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    def eval_questions(source: str, **over) -> tuple[list[str], str]:
        _, ev, report = load_train_examples(make_cfg(tmp_path / "run", eval_data=source, **over))
        return [e.question for e in ev], report["eval_data"]

    both = saved("tt", train=slice(0, 4), test=slice(4, 6))
    questions, summary = eval_questions(both)
    assert questions == ["q4?", "q5?"] and "split 'test'" in summary
    assert eval_questions(both, eval_split="train")[0] == ["q0?", "q1?", "q2?", "q3?"]
    assert eval_questions(saved("tv", train=slice(0, 4), validation=slice(5, 6)))[0] == ["q5?"]
    assert eval_questions(saved("t", train=slice(1, 3)))[0] == ["q1?", "q2?"]  # the only split
    with pytest.raises(TrainDataError, match="--eval-split"):
        eval_questions(saved("td", train=slice(0, 4), dev=slice(4, 6)))
    with pytest.raises(ValueError, match="eval_split: needs eval_data"):
        make_cfg(tmp_path / "run", eval_split="test")


def test_cli_plot_and_config_errors(tmp_path, tokenizer, capsys):
    from gainrl.cli import main

    run(make_cfg(tmp_path / "run", max_steps=1, eval_size=2, save_every=0), tokenizer)
    for png in (tmp_path / "run" / "plots").glob("*.png"):
        png.unlink()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "plots" / "overview.png").is_file()
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert main(["train", "--group-size", "1", "--out", str(tmp_path / "x")]) == 2
    assert "group_size" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "0.5"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--resume continues the run in its own folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--lrr", "1"])


def test_held_out_questions_never_in_training():
    """A synthetic set larger than its distinct questions repeats them: the split holds out question texts, so no
    eval question is also trained on."""
    from gainrl.trainer import load_train_examples

    cfg = build_config(overrides=dict(synthetic_size=1000, synthetic_levels="1", eval_size=64))
    train, held = load_train_examples(cfg)[:2]
    assert len(held) == 64 and len({ex.question for ex in held}) == 64
    assert not {ex.question for ex in held} & {ex.question for ex in train}
    assert len({ex.question for ex in train}) < len(train)  # the repeats stay in training


def test_config_values_name_their_field():
    with pytest.raises(ValueError, match="lr: expected a float value, got none"):
        build_config(yaml_values={"lr": None})
    with pytest.raises(ValueError, match="few_shot: expected a list"):
        build_config(overrides={"few_shot": "[[q, a]]"})
    with pytest.raises(ValueError, match="rewards: expected name=weight"):
        build_config(overrides={"rewards": "accuracy=high"})
    with pytest.raises(ValueError, match="data: expected a string"):
        build_config(yaml_values={"data": ["a", "b"]})
    # `--data none` on the command line is `data: null` in YAML: the embedded demo's defaults
    assert build_config(overrides={"data": "none"}) == build_config(yaml_values={"data": None})


def test_resume_cannot_stretch_a_cosine_schedule():
    cfg = build_config(overrides=dict(lr_schedule="cosine", max_steps=10))
    with pytest.raises(ValueError, match="lr_schedule='cosine'"):
        apply_resume_overrides(cfg, {"max_steps": "20"})
    assert apply_resume_overrides(build_config(overrides=dict(max_steps=10)), {"max_steps": "20"}).max_steps == 20
