"""GAIN-RL inside TRL's ``GRPOTrainer`` (tested with TRL 1.16 / transformers 5.x; the extra pins ``trl>=1.10,<2``).

:class:`GainRLGRPOTrainer` is a ``GRPOTrainer`` whose loop runs GAIN-RL (DESIGN.md §2), in four places:

1. **Sampling** (``_get_train_sampler``): :class:`GainRLRepeatSampler` replaces TRL's ``RepeatSampler`` and keeps its
   contract: each prompt ``num_generations`` times in a row, chunks of ``generation_batch_size // num_generations``
   prompts repeated ``num_iterations × steps_per_generation`` times, the same stream on every rank (the draw is a
   pure function of the shared, identically updated sampler state). One TRL epoch is one GAIN-RL epoch of
   ``samples_per_epoch`` prompts drawn with ``P(r) ∝ exp(−(r − μ)²/2σ²)`` over the ``gainrl score`` ranks.
2. **Feedback, no extra pass, no per-sample host sync**: per-rollout 0/1 correctness is the column of the accuracy
   reward function in TRL's (already gathered) reward matrix; ``C_causal`` is measured by
   :class:`gainrl_kernels.probe.AngleProbe` *inside the policy forward that TRL runs for the loss* (first pass over
   each generation batch only, so each rollout counts once), with segments ``[prompt, completion]``. Both are summed
   on the device; nothing leaves it until the epoch ends.
3. **μ update** (``on_epoch_end``, a :class:`GainRLCallback`): one ``accelerator.gather`` of the four sums per epoch,
   then ``μ ← μ + clip(n·tanh(α(acc − β)) + n·tanh(α·ang), adj_min, adj_max)`` in float64 on the host, the same
   numbers on every rank, so every rank draws the same next epoch.
4. **Checkpoints**: ``gainrl_sampler.json`` in every ``checkpoint-N`` folder (μ, the generator state, the draw in
   progress and the feedback gathered so far in it); ``resume_from_checkpoint`` restores it, and TRL's batch
   skipping then replays the same stream.

Use::

    from gainrl.integrations.trl import GainRLConfig, GainRLGRPOTrainer, gainrl_accuracy

    trainer = GainRLGRPOTrainer(
        model=model, args=GRPOConfig(...), train_dataset=ds,          # ds rows: "prompt", "answer"
        reward_funcs=[gainrl_accuracy],                                 # 0/1 correctness via math-verify
        gainrl=GainRLConfig(order="runs/score", samples_per_epoch=512),  # `gainrl score` output dir
    )
    trainer.train()
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler
from transformers import TrainerCallback
from trl import GRPOTrainer

from gainrl.integrations import GainRLCurriculum, load_order
from gainrl.sampler import MuUpdateConfig

logger = logging.getLogger(__name__)

STATE_FILE = "gainrl_sampler.json"
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


# --------------------------------------------------------------------------------------------------------------
# Configuration and reward
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GainRLConfig:
    """GAIN-RL settings of :class:`GainRLGRPOTrainer`.

    Attributes:
        order: the score order: a ``gainrl score`` output directory, its ``order.pt``, a JSON list, or a sequence of
            dataset indices (rank ``r`` -> ``train_dataset[order[r]]``).
        samples_per_epoch: ``m`` prompts per GAIN-RL epoch (= one TRL epoch); a multiple of
            ``generation_batch_size // num_generations``.
        sigma, mu0, shuffle: Gaussian width, initial centre rank, and whether an epoch is fed in random rather than
            rank order (DESIGN.md §2: rank order by default).
        seed: sampler seed (default: ``GRPOConfig.seed``).
        mu_update: constants of the μ update.
        accuracy_reward: name (``reward_func_names`` entry) of the reward function whose output is 0/1 correctness;
            default: :func:`gainrl_accuracy` when it is among the reward functions. Its weight may be 0.
        use_angle: ``False`` leaves out the angle term (accuracy-only ablation; no probe is installed).
        probe_layer, probe_backend: decoder layer whose MLP input is measured (default: last) and the
            ``angle_stats`` backend.
    """

    order: Any
    samples_per_epoch: int
    sigma: float = 1000.0
    mu0: float = 0.0
    seed: int | None = None
    shuffle: bool = False
    mu_update: MuUpdateConfig = field(default_factory=MuUpdateConfig)
    accuracy_reward: str | None = None
    use_angle: bool = True
    probe_layer: int = -1
    probe_backend: str = "auto"


def _completion_text(completion: Any) -> str:
    """Text of a TRL completion: a string, or a list of chat messages (assistant contents, text blocks joined)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion or []:
        if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


def gainrl_accuracy(completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the completion's final answer equals the reference, else 0.0
    (:func:`gainrl.rewards.is_correct`, math-verify). Reads the reference from the ``answer`` column (or
    ``solution``); works for plain-text and conversational completions. This is the ``acc`` of the μ update."""
    from gainrl.rewards import is_correct

    refs = answer if answer is not None else kwargs.get("solution")
    if refs is None:
        raise ValueError("gainrl_accuracy: the dataset needs an `answer` (or `solution`) column")
    if len(refs) != len(completions):
        raise ValueError(f"gainrl_accuracy: {len(completions)} completions for {len(refs)} answers")
    return [float(is_correct(_completion_text(c), a)) for c, a in zip(completions, refs, strict=True)]


# --------------------------------------------------------------------------------------------------------------
# Sampler and callback
# --------------------------------------------------------------------------------------------------------------


class GainRLRepeatSampler(Sampler[int]):
    """TRL's ``RepeatSampler`` layout over the GAIN-RL draw of the epoch in progress.

    Each ``__iter__`` yields the current epoch's dataset indices (drawn once per epoch by the curriculum, so a
    re-iteration or a resumed epoch sees the same stream) in chunks of ``batch_size`` prompts; every chunk is repeated
    ``repeat_count`` times and every prompt ``mini_repeat_count`` times in a row.
    """

    def __init__(self, curriculum: GainRLCurriculum, mini_repeat_count: int, batch_size: int, repeat_count: int):
        if curriculum.m % batch_size:
            raise ValueError(
                f"samples_per_epoch ({curriculum.m}) must be a multiple of the prompts per generation batch "
                f"(generation_batch_size // num_generations = {batch_size})"
            )
        self.curriculum = curriculum
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count

    def __iter__(self) -> Iterator[int]:
        indices = self.curriculum.indices()
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start : start + self.batch_size]
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return self.curriculum.m * self.mini_repeat_count * self.repeat_count


class GainRLCallback(TrainerCallback):
    """Epoch boundaries of :class:`GainRLGRPOTrainer`: μ update at ``on_epoch_end``; at ``on_epoch_begin``, finish an
    epoch a resumed checkpoint left complete but not yet closed, then draw the new one."""

    def __init__(self, trainer: GainRLGRPOTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._gainrl_epoch_begin(state)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._gainrl_epoch_end(state)
        return control


# --------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------


def _trainer_epoch(state: Any) -> int:
    """Index of the TRL epoch that starts (or resumes) now: ``state.epoch`` is ``E + steps_done / steps_in_epoch``
    and reaches exactly ``E + 1`` at the last step of epoch ``E``."""
    return int(math.floor(float(state.epoch or 0.0) + 1e-9))


class GainRLGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with GAIN-RL sampling and μ updates (see the module docstring).

    Args:
        *args, **kwargs: as ``GRPOTrainer`` (map-style ``train_dataset`` only).
        gainrl: a :class:`GainRLConfig`.

    Attributes:
        gainrl: the :class:`~gainrl.integrations.GainRLCurriculum` (``mu``, ``epoch``, ``history``, ``indices()``).
        gainrl_last_causal: per-rollout ``C_causal`` ``[B]`` of the last measured loss forward (on device).
    """

    def __init__(self, *args: Any, gainrl: GainRLConfig, **kwargs: Any) -> None:
        if not isinstance(gainrl, GainRLConfig):
            raise ValueError(f"gainrl: expected a GainRLConfig, got {type(gainrl).__name__}")
        self.gainrl_config = gainrl
        self._gainrl_sums: torch.Tensor | None = None
        self._gainrl_probe = None
        self._gainrl_measure = False
        self._gainrl_acc_local: torch.Tensor | None = None
        self._gainrl_logged = 0
        self.gainrl_last_causal: torch.Tensor | None = None
        super().__init__(*args, **kwargs)

        if self.train_dataset is None or isinstance(self.train_dataset, IterableDataset):
            raise ValueError("GainRLGRPOTrainer needs a map-style train_dataset (GAIN-RL samples dataset indices)")
        order = load_order(gainrl.order, dataset_size=len(self.train_dataset))
        per_generation = self.args.generation_batch_size // self.num_generations
        if gainrl.samples_per_epoch % per_generation:
            raise ValueError(
                f"GainRLConfig.samples_per_epoch ({gainrl.samples_per_epoch}) must be a multiple of "
                f"generation_batch_size // num_generations = {per_generation}"
            )
        names = list(self.reward_func_names)
        name = gainrl.accuracy_reward or ("gainrl_accuracy" if "gainrl_accuracy" in names else None)
        if name is None or name not in names:
            raise ValueError(
                f"GainRLConfig.accuracy_reward: name the reward function that returns 0/1 correctness, one of {names} "
                "(or add gainrl.integrations.trl.gainrl_accuracy to reward_funcs)"
            )
        self._gainrl_acc_col = names.index(name)
        self.gainrl = GainRLCurriculum(
            order,
            gainrl.samples_per_epoch,
            sigma=gainrl.sigma,
            mu0=gainrl.mu0,
            seed=self.args.seed if gainrl.seed is None else gainrl.seed,
            shuffle=gainrl.shuffle,
            mu_cfg=gainrl.mu_update,
            use_angle=gainrl.use_angle,
        )
        self.add_callback(GainRLCallback(self))

    # -- 1. sampling ----------------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset: Any = None) -> Sampler:
        if dataset is not None and dataset is not self.train_dataset:
            return super()._get_train_sampler(dataset)
        return GainRLRepeatSampler(
            self.gainrl,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    # -- 2. feedback ----------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:  # rows of all ranks, in process order: keep this rank's slice of the accuracy column
            start = self.accelerator.process_index * len(prompts)
            self._gainrl_acc_local = rewards_per_func[start : start + len(prompts), self._gainrl_acc_col].clone()
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        acc, self._gainrl_acc_local = self._gainrl_acc_local, None
        if acc is not None and self.model.training:
            if acc.shape[0] != output["completion_ids"].shape[0]:
                raise RuntimeError(
                    f"GAIN-RL: {acc.shape[0]} accuracy values for {output['completion_ids'].shape[0]} completions"
                )
            output["gainrl_acc"] = acc  # travels with the rollouts through TRL's shuffle and split
        return output

    def _gainrl_get_probe(self):
        if self._gainrl_probe is None:
            from gainrl_kernels.probe import AngleProbe

            cfg = self.gainrl_config
            self._gainrl_probe = AngleProbe(
                self.accelerator.unwrap_model(self.model), layer=cfg.probe_layer, backend=cfg.probe_backend
            )
            self._gainrl_probe.enabled = False  # measures only inside _get_per_token_logps_and_entropies below
        return self._gainrl_probe

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if not (self._gainrl_measure and self.gainrl.use_angle):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        probe = self._gainrl_get_probe()
        causal: list[torch.Tensor] = []
        has_completion: list[torch.Tensor] = []

        def describe_batch(module, args, kw):
            # TRL may chunk the batch: describe each chunk from its own mask. Real tokens are the left-padded prompt
            # then the right-padded completion, so segments relative to the first real token are
            # [0, n_prompt) and [n_prompt, n_prompt + n_completion).
            mask = kw.get("attention_mask")
            if mask is None:
                raise RuntimeError("GAIN-RL angle probe: the policy forward got no attention_mask keyword")
            real = mask != 0
            n_total = real.sum(1)
            n_prompt = real[:, : mask.shape[1] - logits_to_keep].sum(1)
            seg = torch.stack([torch.zeros_like(n_total), n_prompt, n_total], 1).to(torch.int32)
            probe.set_batch(seg, attention_mask=mask)
            has_completion.append(n_total > n_prompt)

        def collect(module, args, kw, out):
            # a rollout whose completion is masked out (empty, or truncated under mask_truncated_completions) is not
            # measured over prompt + response: NaN, left out of the epoch's angle like a too-short sequence
            c = probe.metrics().causal
            causal.append(torch.where(has_completion[-1], c, torch.full_like(c, float("nan"))))

        target = probe.model
        handles = [
            target.register_forward_pre_hook(describe_batch, with_kwargs=True),
            target.register_forward_hook(collect, with_kwargs=True),
        ]
        probe.enabled = True
        try:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            probe.enabled = False
            for handle in handles:
                handle.remove()
        self.gainrl_last_causal = torch.cat(causal) if causal else None
        return result

    def _compute_loss(self, model, inputs):
        acc = inputs.get("gainrl_acc")
        steps_per_generation = self.args.steps_per_generation
        first_pass = self._step % (steps_per_generation * self.num_iterations) < steps_per_generation
        if acc is None or not self.model.training or not first_pass:
            return super()._compute_loss(model, inputs)
        self._gainrl_measure = True
        self.gainrl_last_causal = None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._gainrl_measure = False
        self._gainrl_accumulate(acc, self.gainrl_last_causal if self.gainrl.use_angle else None)
        return loss

    def _gainrl_accumulate(self, acc: torch.Tensor, causal: torch.Tensor | None) -> None:
        """Add this micro-batch's sums to the on-device accumulator (no host sync)."""
        device = self.accelerator.device
        acc = acc.detach().to(device=device, dtype=torch.float64)
        ok = ~torch.isnan(acc)  # None rewards are NaN in TRL: not a rollout with a verdict
        parts = [torch.where(ok, acc, 0.0).sum(), ok.sum().to(torch.float64)]
        if causal is not None:
            c = causal.detach().to(device=device, dtype=torch.float64)
            okc = torch.isfinite(c)  # NaN when a sequence has < 2 tokens
            parts += [torch.where(okc, c, 0.0).sum(), okc.sum().to(torch.float64)]
        else:
            parts += [torch.zeros((), dtype=torch.float64, device=device)] * 2
        sums = torch.stack(parts)
        self._gainrl_sums = sums if self._gainrl_sums is None else self._gainrl_sums + sums

    # -- 3. epoch boundaries and the μ update -----------------------------------------------------------------------

    def _gainrl_global_pending(self) -> list[float]:
        """Feedback of the epoch in progress summed over all ranks (a collective: every rank must call it)."""
        local = self._gainrl_sums
        if local is None:
            local = torch.zeros(4, dtype=torch.float64, device=self.accelerator.device)
        totals = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, 4).sum(0).tolist()
        return [p + t for p, t in zip(self.gainrl.pending, totals, strict=True)]

    def _gainrl_finish(self) -> dict[str, Any]:
        totals = self._gainrl_global_pending()
        self._gainrl_sums = None
        self.gainrl.pending = [0.0, 0.0, 0.0, 0.0]
        record = self.gainrl.finish_epoch(totals)
        logger.info(
            "GAIN-RL epoch %d: acc=%s ang=%s mu %.2f -> %.2f", record["epoch"], record["acc"], record["ang"],
            record["mu_before"], record["mu_after"],
        )
        return record

    def _gainrl_epoch_begin(self, state: Any) -> None:
        target = _trainer_epoch(state)
        while self.gainrl.epoch < target:
            if not self.gainrl.drawn:
                logger.warning(
                    "GAIN-RL: TRL resumes at epoch %d but the sampler state is at epoch %d with no draw in progress "
                    "(checkpoint without %s?): continuing from the restored μ=%.2f",
                    target, self.gainrl.epoch, STATE_FILE, self.gainrl.mu,
                )
                self.gainrl.epoch = target
                break
            self._gainrl_finish()  # a checkpoint taken at the last step of an epoch, before on_epoch_end
        self.gainrl.ranks()  # draw now, in lockstep on every rank (no-op when resuming mid-epoch)

    def _gainrl_epoch_end(self, state: Any) -> None:
        # An epoch cut short by max_steps is not closed: its feedback is incomplete (a resumed run finishes it).
        if self.gainrl.drawn and float(state.epoch or 0.0) >= self.gainrl.epoch + 1 - 1e-9:
            self._gainrl_finish()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model is not None and self.model.training and "loss" in logs:
            logs["gainrl/mu"] = self.gainrl.mu
            logs["gainrl/epoch"] = float(self.gainrl.epoch)
            for record in self.gainrl.history[self._gainrl_logged :]:
                if not record.get("skipped"):
                    logs["gainrl/epoch_acc"] = record["acc"]
                    logs["gainrl/epoch_ang"] = record["ang"]
            self._gainrl_logged = len(self.gainrl.history)
        super().log(logs, start_time)

    # -- 4. checkpoints -------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        pending = self._gainrl_global_pending()  # every rank: a collective
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{CHECKPOINT_PREFIX}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.gainrl.save_json(os.path.join(folder, STATE_FILE), pending=pending)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.exists(path):
            self.gainrl.load_json(path)  # global feedback so far rides in `pending`; local sums restart at 0
            self._gainrl_sums = None
            self._gainrl_logged = len(self.gainrl.history)
        else:
            logger.warning("GAIN-RL: %s has no %s; the sampler starts afresh", checkpoint, STATE_FILE)


__all__ = [
    "GainRLCallback",
    "GainRLConfig",
    "GainRLGRPOTrainer",
    "GainRLRepeatSampler",
    "STATE_FILE",
    "gainrl_accuracy",
]
