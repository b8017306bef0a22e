"""GAIN-RL inside TRL's GRPOTrainer, on CPU with a tiny random Qwen2 and a local tokenizer (no Hub access).

One 12-step run (3 GAIN-RL epochs of 8 prompts, 2 generations each, 4 rollouts per step, checkpoints every 2 steps)
is shared by most tests. They check, from what TRL itself did:

* the prompts TRL's dataloader handed to the reward function are exactly our sampler's Gaussian draws, epoch after
  epoch, in TRL's RepeatSampler layout, and each epoch was drawn with the μ that our update produced from the
  previous epoch's logged acc / ang (replayed offline with GaussianRankSampler + mu_update);
* acc is the fraction of correct rollouts (0/1 verdicts recorded by the reward function);
* ang is the mean C_causal of the rollouts, measured inside TRL's own loss forward (float64 reference from hooked
  activations of that same forward's inputs);
* resuming from a mid-epoch checkpoint and from one taken at the last step of an epoch replays the same prompt
  stream and the same μ history as the uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tiny_models import chat_tokenizer, tiny_lm  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from gainrl.integrations import GainRLCurriculum, load_order  # noqa: E402
from gainrl.integrations.trl import (  # noqa: E402
    STATE_FILE,
    GainRLConfig,
    GainRLGRPOTrainer,
    GainRLRepeatSampler,
    gainrl_accuracy,
)
from gainrl.sampler import GaussianRankSampler, MuUpdateConfig, mu_update  # noqa: E402
from gainrl_kernels.probe import find_decoder_layers  # noqa: E402

N_ROWS = 48
M = 8  # prompts per GAIN-RL epoch
G = 2  # generations per prompt
PER_STEP = 4  # rollouts per step (= generation batch: steps_per_generation = 1)
STEPS_PER_EPOCH = M * G // PER_STEP
MAX_STEPS = 3 * STEPS_PER_EPOCH
SIGMA = 4.0
SEED = 7
MU_CFG = MuUpdateConfig(n=6.0, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=20.0)
ORDER = [(5 * i + 3) % N_ROWS for i in range(N_ROWS)]  # a permutation: rank r -> row ORDER[r]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls run on one thread


def dataset():
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i), "row": i}
        for i in range(N_ROWS)
    ]
    return datasets.Dataset.from_list(rows)


class Recorder:
    """A 0/1 'accuracy' reward that depends on the row and the completion (so groups have non-zero advantages and
    the policy really trains); records what TRL fed it, per call (= per generation batch)."""

    __name__ = "fake_accuracy"

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[float]]] = []

    def __call__(self, completions, row, **kwargs):
        texts = [c[0]["content"] for c in completions]
        verdicts = [float((r + sum(map(ord, t))) % 3 != 0) for r, t in zip(row, texts, strict=True)]
        self.calls.append((list(row), verdicts))
        return verdicts


class ReferenceTrainer(GainRLGRPOTrainer):
    """Records, for every measured loss forward, the probe's per-rollout C_causal and a float64 reference computed
    from the last layer's up_proj input of a plain forward over the same inputs (test-only second pass)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.completion_rows: list[torch.Tensor] = []

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self._gainrl_measured_now():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            net = self.accelerator.unwrap_model(self.model)
            got = []
            handle = find_decoder_layers(net)[-1].mlp.up_proj.register_forward_pre_hook(
                lambda m, a: got.append(a[0].detach())
            )
            try:
                with torch.no_grad():
                    net(input_ids=ids, attention_mask=mask)
            finally:
                handle.remove()
            ref = []
            for b in range(ids.shape[0]):
                u = torch.nn.functional.normalize(got[0][b][mask[b] != 0].double(), dim=-1, eps=1e-12)
                n = u.shape[0]
                s = u.sum(0)
                ref.append(((s @ s) - (u * u).sum()) / (n * (n - 1)))
            self.measured.append((self.gainrl.epoch, self.gainrl_last_causal.detach().double(), torch.stack(ref)))
            self.completion_rows.append(inputs["completion_mask"].sum(1) > 0)
        return loss

    def _gainrl_measured_now(self) -> bool:
        spg = self.args.steps_per_generation
        return self._step % (spg * self.num_iterations) < spg and self.gainrl_last_causal is not None


def make_trainer(out_dir, recorder, cls=GainRLGRPOTrainer, save_steps=2, max_steps=MAX_STEPS, grpo=None,
                 **gainrl_overrides):
    grpo_kwargs = dict(
        output_dir=str(out_dir), per_device_train_batch_size=PER_STEP, num_generations=G, max_completion_length=6,
        max_steps=max_steps, learning_rate=1e-2, logging_steps=1, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    grpo_kwargs.update(grpo or {})
    args = GRPOConfig(**grpo_kwargs)
    cfg = dict(order=ORDER, samples_per_epoch=M, sigma=SIGMA, seed=SEED, mu_update=MU_CFG,
               accuracy_reward="fake_accuracy")
    cfg.update(gainrl_overrides)
    model = tiny_lm("qwen2", seed=1)
    model.train()
    return cls(model=model, reward_funcs=[recorder], args=args, train_dataset=dataset(),
               processing_class=chat_tokenizer(), gainrl=GainRLConfig(**cfg))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gainrl_trl_full")
    recorder = Recorder()
    trainer = make_trainer(out, recorder, cls=ReferenceTrainer)
    trainer.train()
    return trainer, recorder, out


def repeat_layout(indices, per_generation=PER_STEP // G, repeat=1):
    out = []
    for start in range(0, len(indices), per_generation):
        for _ in range(repeat):
            for i in indices[start : start + per_generation]:
                out += [i] * G
    return out


def test_trl_dataloader_yields_our_gaussian_draws_and_mu_updates(full_run):
    trainer, recorder, _ = full_run
    history = trainer.gainrl.history
    assert [h["epoch"] for h in history] == [0, 1, 2] and trainer.gainrl.epoch == 3
    calls_per_epoch = STEPS_PER_EPOCH
    assert len(recorder.calls) == 3 * calls_per_epoch
    replay = GaussianRankSampler(N_ROWS, M, sigma=SIGMA, seed=SEED, mu_cfg=MU_CFG)
    for e, record in enumerate(history):
        assert record["mu_at_draw"] == pytest.approx(replay.mu, abs=1e-12)
        ranks = replay.sample_epoch()
        expected = repeat_layout([ORDER[r] for r in ranks])
        seen = [r for rows, _ in recorder.calls[e * calls_per_epoch : (e + 1) * calls_per_epoch] for r in rows]
        assert seen == expected, f"epoch {e}: TRL fed {seen}, our sampler drew {expected}"
        # the μ update, recomputed from the logged acc / ang with the formula of DESIGN.md §2
        want = mu_update(replay.mu, record["acc"], record["ang"], N_ROWS, MU_CFG)
        step = MU_CFG.n * math.tanh(MU_CFG.alpha * (record["acc"] - MU_CFG.beta)) + MU_CFG.n * math.tanh(
            MU_CFG.alpha * record["ang"]
        )
        assert want == pytest.approx(min(max(replay.mu + min(max(step, 0.0), 20.0), 0.0), N_ROWS - 1))
        assert record["mu_after"] == pytest.approx(want, abs=1e-12)
        replay.update_mu(record["acc"], record["ang"])
    assert trainer.gainrl.mu > 0.0  # μ moved
    assert any(h.get("grad_norm", 0.0) > 0 for h in trainer.state.log_history)  # and the policy trained
    assert [h["gainrl/mu"] for h in trainer.state.log_history if "gainrl/mu" in h][-1] == history[-2]["mu_after"]


def test_acc_is_fraction_of_correct_rollouts(full_run):
    trainer, recorder, _ = full_run
    for e, record in enumerate(trainer.gainrl.history):
        verdicts = [v for _, vs in recorder.calls[e * STEPS_PER_EPOCH : (e + 1) * STEPS_PER_EPOCH] for v in vs]
        assert record["n_acc"] == M * G
        assert record["acc"] == pytest.approx(sum(verdicts) / len(verdicts), abs=1e-12)


def test_ang_is_c_causal_measured_in_trl_loss_forward(full_run):
    trainer, _, _ = full_run
    assert len(trainer.measured) == MAX_STEPS
    # the probe measured exactly one forward per step: TRL's loss forward (not generation, not the gradient-
    # checkpointing recomputation in backward, not this test's reference forward)
    assert trainer.args.gradient_checkpointing and trainer._gainrl_probe.captures == MAX_STEPS
    for _, got, ref in trainer.measured:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for record in trainer.gainrl.history:
        refs = torch.cat([ref for e, _, ref in trainer.measured if e == record["epoch"]])
        assert record["n_ang"] == M * G
        assert record["ang"] == pytest.approx(float(refs.mean()), abs=1e-5)


def test_masked_truncated_completions_are_not_measured(tmp_path):
    """With mask_truncated_completions a truncated rollout's completion mask is all zeros: its C_causal would cover
    the prompt alone, so it is NaN and left out of the epoch's angle; the others are measured as usual."""
    trainer = make_trainer(tmp_path, Recorder(), cls=ReferenceTrainer, save_steps=0, max_steps=4,
                           grpo=dict(mask_truncated_completions=True))
    eos = trainer.processing_class.convert_tokens_to_ids("<|im_end|>")
    head = trainer.model.get_output_embeddings()  # end some rollouts within the 6 tokens: EOS at p ~ 0.08 a token
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos] = 3.5
    trainer.model.set_output_embeddings(biased)
    trainer.train()
    rows = torch.cat(trainer.completion_rows)
    got = torch.cat([g for _, g, _ in trainer.measured])
    ref = torch.cat([r for _, _, r in trainer.measured])
    assert (~rows).any() and rows.any(), "want truncated and finished rollouts both"
    assert torch.isnan(got[~rows]).all()
    torch.testing.assert_close(got[rows], ref[rows], rtol=1e-4, atol=1e-5)


def test_checkpoints_hold_sampler_state(full_run):
    _, _, out = full_run
    mid = json.loads((out / "checkpoint-6" / STATE_FILE).read_text())
    assert mid["epoch"] == 1 and mid["ranks"] is not None and mid["pending"][1] == 2 * PER_STEP
    boundary = json.loads((out / "checkpoint-4" / STATE_FILE).read_text())
    assert boundary["epoch"] == 0 and boundary["pending"][1] == M * G  # saved before on_epoch_end closed it


@pytest.mark.parametrize("step", [6, 4], ids=["mid-epoch", "epoch-boundary"])
def test_resume_restores_mu_and_sample_stream(full_run, tmp_path, step):
    trainer, recorder, out = full_run
    resumed_recorder = Recorder()
    resumed = make_trainer(tmp_path, resumed_recorder, save_steps=0)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
    tail = [rows for rows, _ in recorder.calls[step:]]
    assert [rows for rows, _ in resumed_recorder.calls] == tail
    assert resumed.gainrl.epoch == 3
    for a, b in zip(resumed.gainrl.history, trainer.gainrl.history, strict=True):
        assert a["mu_at_draw"] == pytest.approx(b["mu_at_draw"], abs=1e-9)
        assert a["acc"] == pytest.approx(b["acc"], abs=1e-9)
        assert a["ang"] == pytest.approx(b["ang"], abs=1e-5)
        assert a["mu_after"] == pytest.approx(b["mu_after"], abs=1e-4)


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import test_trl_integration as T
out = Path(sys.argv[1])
recorder = T.Recorder()
trainer = T.make_trainer(out / "run", recorder, save_steps=0, max_steps=4)
trainer.train()
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps(
    {"world": trainer.accelerator.num_processes, "history": trainer.gainrl.history, "calls": recorder.calls}))
# an undestroyed gloo group can abort the interpreter at exit ("terminate called without an active exception"):
# the teardown gainrl score does
from gainrl.distributed import ProcessGroup
ProcessGroup(rank, trainer.accelerator.num_processes, owned=True).close()
"""


def test_two_ranks_gather_feedback_and_draw_the_same_stream(tmp_path):
    """torchrun, 2 CPU processes (gloo): every rank ends with the same μ history, computed from the feedback of
    both ranks (16 rollouts per epoch, 8 per rank), and the ranks' shares of each step form our global draw."""
    tests_dir = Path(__file__).resolve().parent
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["history"] == ranks[1]["history"]
    history = ranks[0]["history"]
    assert len(history) == 2  # 16 rollouts per epoch, 8 per step over 2 ranks: 2 steps per epoch
    replay = GaussianRankSampler(N_ROWS, M, sigma=SIGMA, seed=SEED, mu_cfg=MU_CFG)
    for e, record in enumerate(history):
        steps = range(2 * e, 2 * e + 2)
        seen = [r for s in steps for rank in ranks for r in rank["calls"][s][0]]
        assert seen == repeat_layout([ORDER[r] for r in replay.sample_epoch()], per_generation=2 * PER_STEP // G)
        verdicts = [v for s in steps for rank in ranks for v in rank["calls"][s][1]]
        assert record["n_acc"] == record["n_ang"] == M * G
        assert record["acc"] == pytest.approx(sum(verdicts) / len(verdicts), abs=1e-12)
        assert record["mu_after"] == pytest.approx(replay.update_mu(record["acc"], record["ang"]), abs=1e-12)


def test_reused_generations_count_once(tmp_path):
    """num_iterations = 2 and steps_per_generation = 2: each rollout is trained on twice over two micro-steps; the
    sampler repeats each chunk 4 times, and the feedback counts each rollout once (first pass only)."""
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, recorder, cls=ReferenceTrainer, save_steps=0, max_steps=8,
        grpo=dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_iterations=2),
    )
    trainer.train()
    assert len(trainer.gainrl.history) == 1
    record = trainer.gainrl.history[0]
    assert record["n_acc"] == record["n_ang"] == M * G
    ranks = GaussianRankSampler(N_ROWS, M, sigma=SIGMA, seed=SEED, mu_cfg=MU_CFG).sample_epoch()
    assert [r for rows, _ in recorder.calls for r in rows] == repeat_layout([ORDER[r] for r in ranks])
    refs = torch.cat([ref for _, _, ref in trainer.measured])
    assert refs.numel() == M * G and record["ang"] == pytest.approx(float(refs.mean()), abs=1e-5)


def test_repeat_sampler_layout_matches_trl():
    from trl.trainer.utils import RepeatSampler

    cur = GainRLCurriculum(list(range(12)), 12, sigma=1e9)  # m = N: every rank, in rank order
    ours = list(GainRLRepeatSampler(cur, mini_repeat_count=3, batch_size=4, repeat_count=2))
    theirs = list(RepeatSampler(list(range(12)), mini_repeat_count=3, batch_size=4, repeat_count=2, shuffle=False))
    assert ours == theirs and len(GainRLRepeatSampler(cur, 3, 4, 2)) == len(theirs)
    with pytest.raises(ValueError, match="multiple"):
        GainRLRepeatSampler(GainRLCurriculum(list(range(12)), 6), mini_repeat_count=2, batch_size=4, repeat_count=1)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="samples_per_epoch"):
        make_trainer(tmp_path, Recorder(), samples_per_epoch=7)
    with pytest.raises(ValueError, match="accuracy_reward"):
        make_trainer(tmp_path, Recorder(), accuracy_reward=None)
    with pytest.raises(ValueError, match="out of range"):
        make_trainer(tmp_path, Recorder(), order=[0, 1, N_ROWS])


def test_gainrl_accuracy_reward():
    completions = [
        [{"role": "assistant", "content": "<think>2+2</think> <answer>4</answer>"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "so \\boxed{\\frac{1}{2}}"}]}],
        "The answer is 5",
        [{"role": "assistant", "content": "no idea"}],
    ]
    assert gainrl_accuracy(completions, answer=["4", "0.5", "6", "3"]) == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        gainrl_accuracy(completions)


def test_curriculum_epoch_logic_and_state(tmp_path):
    cur = GainRLCurriculum([3, 1, 2, 0, 4, 5], 3, sigma=2.0, seed=1, mu_cfg=MuUpdateConfig(n=2.0, adj_max=5.0))
    first = cur.ranks()
    assert cur.ranks() == first and len(set(first)) == 3  # drawn once per epoch
    assert cur.indices() == [[3, 1, 2, 0, 4, 5][r] for r in first]
    cur.add(2, 3, 0.6, 3)
    cur.save_json(tmp_path / "s.json")
    record = cur.finish_epoch([1, 3, 0.3, 3])
    assert record["acc"] == pytest.approx(0.5) and record["ang"] == pytest.approx(0.15)
    assert cur.mu == pytest.approx(mu_update(0.0, 0.5, 0.15, 6, MuUpdateConfig(n=2.0, adj_max=5.0)))
    assert not cur.drawn and cur.epoch == 1
    # restore the mid-epoch state: same draw, same pending feedback, same next draw after the same update
    again = GainRLCurriculum([3, 1, 2, 0, 4, 5], 3, sigma=2.0, seed=1, mu_cfg=MuUpdateConfig(n=2.0, adj_max=5.0))
    again.load_json(tmp_path / "s.json")
    assert again.ranks() == first and again.pending == [2, 3, 0.6, 3]
    again.finish_epoch([1, 3, 0.3, 3])
    assert again.ranks() == cur.ranks()
    # no feedback: μ kept; feedback without angle: a wiring bug
    assert cur.finish_epoch()["skipped"]
    cur.add(1, 2)
    with pytest.raises(RuntimeError, match="angle"):
        cur.finish_epoch()
    with pytest.raises(ValueError, match="0/1"):
        cur.add(3, 2, 0, 1)
    with pytest.raises(ValueError, match="different score order"):
        GainRLCurriculum([0, 1, 2, 3, 4, 5], 3).load_json(tmp_path / "s.json")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        GainRLCurriculum([3, 1, 2, 0, 4, 5], 2).load_json(tmp_path / "s.json")
    with pytest.raises(ValueError, match="use_angle=True, this run has use_angle=False"):  # an epoch would never close
        GainRLCurriculum([3, 1, 2, 0, 4, 5], 3, use_angle=False).load_json(tmp_path / "s.json")


def test_load_order(tmp_path):
    torch.save(torch.tensor([2, 0, 1], dtype=torch.int64), tmp_path / "order.pt")
    assert load_order(tmp_path) == [2, 0, 1]
    (tmp_path / "o.json").write_text("[1, 0]")
    assert load_order(tmp_path / "o.json") == [1, 0]
    for bad, msg in (([0, 0], "distinct"), ([], "non-empty"), ([-1], "negative"), ([0.5], "integer")):
        with pytest.raises(ValueError, match=msg):
            load_order(bad)
    with pytest.raises(ValueError, match="out of range"):
        load_order([0, 3], dataset_size=3)
    with pytest.raises(FileNotFoundError):
        load_order(tmp_path / "missing")
