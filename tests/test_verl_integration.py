"""GAIN-RL verl plug-ins, tested against STAND-INS of verl 0.9.1's interfaces (verl needs Ray, vLLM, CUDA...; it is
not installed here). Everything in the "stand-ins" section below is a minimal copy, written for this test, of the
signatures and call order our plug-ins rely on -- it is not verl code:

* verl <= 0.8 ``verl.experimental.dataset.sampler.AbstractSampler / AbstractCurriculumSampler`` (built as
  ``cls(data_source=dataset, data_config=config.data)``; ``update(batch=DataProto)`` after each step) and the part of
  torchdata's ``StatefulDataLoader`` / ``BatchSampler`` checkpoint protocol that verl's ``data.pt`` goes through;
* verl 0.9.1 V1: ``ReplayBuffer(trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy,
  sampler_kwargs, refill_fn)`` with ``sample(global_steps, partition_id, batch_size) -> (KVBatchMeta, metrics)``,
  ``transfer_queue.kv_batch_get(keys, partition_id, select_fields)``, ``RLHFDataset(data_files, tokenizer, config,
  processor, max_samples)``, ``CheckpointCallback.on_save(trainer, global_step, checkpoint_dir, async_save)`` and the
  sync trainer's loop (fetch one batch per step, re-iterating the loader at StopIteration; sample; save; clear).
"""
from __future__ import annotations

import sys
import types
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler, SequentialSampler

from gainrl.integrations import SHARED_CURRICULA
from gainrl.integrations import verl as gverl
from gainrl.sampler import GaussianRankSampler, MuUpdateConfig

N_ROWS = 40
M = 8
TBS = 4  # prompts per step
N_GEN = 2
SIGMA = 5.0
SEED = 3
ORDER = [(7 * i + 2) % N_ROWS for i in range(N_ROWS)]
MU = dict(mu_n=6.0, mu_alpha=2.0, mu_beta=0.5, mu_adj_min=0.0, mu_adj_max=20.0)
MU_CFG = MuUpdateConfig(n=6.0, alpha=2.0, beta=0.5, adj_min=0.0, adj_max=20.0)


# ======================================================================================================================
# STAND-INS of verl / torchdata interfaces (written for this test; NOT verl code)
# ======================================================================================================================


class AbstractSampler(Sampler[int]):
    """Stand-in: verl.experimental.dataset.sampler.AbstractSampler (verl <= 0.8)."""

    @abstractmethod
    def __init__(self, data_source, data_config):
        pass


class AbstractCurriculumSampler(AbstractSampler):
    """Stand-in: verl.experimental.dataset.sampler.AbstractCurriculumSampler (verl <= 0.8)."""

    @abstractmethod
    def update(self, batch) -> None:
        pass


@dataclass
class DataProto:
    """Stand-in: verl.DataProto (tensor ``batch`` + numpy ``non_tensor_batch``)."""

    batch: dict[str, torch.Tensor]
    non_tensor_batch: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.batch.values())))


class StatefulBatchIter:
    """Stand-in: torchdata.stateful_dataloader.sampler._BatchSamplerIterator (what verl's StatefulDataLoader uses
    with num_workers=0): saves ``sampler.state_dict()`` when the sampler is Stateful; on load calls
    ``sampler.load_state_dict`` and re-iterates WITHOUT fast-forwarding (the sampler must resume itself)."""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size, self.samples_yielded = sampler, batch_size, 0
        self.sampler_iter = iter(sampler)

    def __iter__(self):
        return self

    def __next__(self):
        batch = [next(self.sampler_iter) for _ in range(self.batch_size)]
        self.samples_yielded += len(batch)
        return batch

    def state_dict(self):
        return {"samples_yielded": self.samples_yielded, "sampler_state": self.sampler.state_dict()}

    def load_state_dict(self, state):
        self.samples_yielded = state["samples_yielded"]
        self.sampler.load_state_dict(state["sampler_state"])
        self.sampler_iter = iter(self.sampler)


@dataclass
class KVBatchMeta:
    """Stand-in: transfer_queue.KVBatchMeta."""

    partition_id: str
    keys: list[str]
    tags: list[dict] = field(default_factory=list)
    extra_info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


class FakeTransferQueue(types.ModuleType):
    """Stand-in: the ``transfer_queue`` module's KV calls used by verl's ReplayBuffer (in-memory)."""

    def __init__(self):
        super().__init__("transfer_queue")
        self.store: dict[tuple[str, str], dict[str, Any]] = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for i, key in enumerate(keys):
            entry = self.store.setdefault((partition_id, key), {})
            entry.update({k: v[i] for k, v in (fields or {}).items()})
            entry["tag"] = (tags or [{}] * len(keys))[i]

    def kv_batch_get(self, keys, partition_id, select_fields):
        return {f: [self.store[(partition_id, k)][f] for k in keys] for f in select_fields}

    def kv_clear(self, keys, partition_id):
        for key in keys:
            self.store.pop((partition_id, key), None)

    def kv_list(self, partition_id=None):
        out: dict[str, dict] = {}
        for (pid, key), entry in self.store.items():
            if partition_id in (None, pid):
                out.setdefault(pid, {})[key] = entry["tag"]
        return out


class ReplayBuffer:
    """Stand-in: verl.trainer.ppo.v1.replay_buffer.ReplayBuffer -- the constructor a custom sampler receives and the
    sync ``sample`` contract: pick ``batch_size`` finished prompt groups (oldest first) and return their trajectory
    keys ``{uid}_{session}_{index}``."""

    def __init__(self, trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy,
                 sampler_kwargs, poll_interval=2.0, refill_fn=None):
        self.trainer_mode, self.sampler_kwargs, self.refill_fn = trainer_mode, sampler_kwargs, refill_fn

    def sample(self, global_steps, partition_id, batch_size):
        import transfer_queue as tq

        items = tq.kv_list(partition_id).get(partition_id, {})
        prompts = sorted((tag["order"], key) for key, tag in items.items() if tag.get("is_prompt")
                         and tag["status"] == "finished")
        chosen = {key for _, key in prompts[:batch_size]}
        tq.kv_clear(keys=list(chosen), partition_id=partition_id)
        keys = [key for key, tag in items.items() if not tag.get("is_prompt") and key.split("_")[0] in chosen]
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=[items[k] for k in keys]), {}


class RLHFDataset(torch.utils.data.Dataset):
    """Stand-in: verl.utils.dataset.rl_dataset.RLHFDataset's constructor and item access (rows from FILES)."""

    FILES: dict[str, list[dict]] = {}

    def __init__(self, data_files, tokenizer, config, processor=None, max_samples=-1):
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        self.rows = [row for f in files for row in self.FILES[f]]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, item):
        return dict(self.rows[item])


class CheckpointCallback:
    """Stand-in: verl.trainer.ppo.checkpoint_callback.CheckpointCallback."""

    def __init__(self, config=None):
        self.config = config

    def on_save(self, trainer, global_step, checkpoint_dir, async_save=False, **kwargs):
        pass


# ======================================================================================================================
# helpers
# ======================================================================================================================


def verdict(row: int, j: int) -> float:
    """The reward of trajectory j of a prompt (0/1)."""
    return float((row * 3 + j) % 4 != 0)


def angle(row: int, j: int) -> float:
    return 0.1 + 0.01 * ((row + 5 * j) % 7)


def replay_history(history, use_angle=True):
    """Check each epoch's draw μ and μ update against a fresh GaussianRankSampler driven by the logged acc / ang;
    returns the per-epoch draws (dataset indices)."""
    replay = GaussianRankSampler(N_ROWS, M, sigma=SIGMA, seed=SEED, mu_cfg=MU_CFG)
    draws = []
    for record in history:
        assert record["mu_at_draw"] == pytest.approx(replay.mu, abs=1e-12)
        draws.append([ORDER[r] for r in replay.sample_epoch()])
        assert record["mu_after"] == pytest.approx(replay.update_mu(record["acc"], record["ang"]), abs=1e-12)
        if not use_angle:
            assert record["ang"] == 0.0
    return draws


# ======================================================================================================================
# verl <= 0.8: data.sampler.class_path
# ======================================================================================================================


def old_api_config(**overrides):
    sampler = dict(class_path="pkg://gainrl.integrations.verl", class_name="GainRLCurriculumSampler", order=ORDER,
                   samples_per_epoch=M, sigma=SIGMA, seed=SEED, **MU)
    sampler.update(overrides)
    return {"train_batch_size": TBS, "dataloader_num_workers": 0, "sampler": sampler}


def run_old_api(sampler, epochs, start_state=None, stop_after=None):
    """verl <= 0.8 ray_trainer.fit: ``for epoch: for batch in dataloader: ...; sampler.update(batch=batch)``."""
    seen, saved = [], None
    step = 0
    for _ in range(epochs):
        it = StatefulBatchIter(sampler, TBS)
        if start_state is not None:
            it.load_state_dict(start_state)
            start_state = None
        for rows in it:
            uid = np.array([f"u{r}" for r in rows for _ in range(N_GEN)], dtype=object)
            scores = torch.zeros(len(rows) * N_GEN, 5)
            scores[:, -1] = torch.tensor([verdict(r, j) for r in rows for j in range(N_GEN)])
            ang = torch.tensor([angle(r, j) for r in rows for j in range(N_GEN)])
            sampler.update(batch=DataProto({"token_level_scores": scores, "gainrl_causal": ang}, {"uid": uid}))
            seen.append(list(rows))
            step += 1
            if stop_after is not None and step == stop_after:
                return seen, it.state_dict()
    return seen, saved


def test_old_api_curriculum_sampler_draws_and_updates_mu():
    cls = gverl.make_curriculum_sampler_class(AbstractCurriculumSampler)
    sampler = cls(data_source=list(range(N_ROWS)), data_config=old_api_config())
    assert isinstance(sampler, AbstractCurriculumSampler) and len(sampler) == M
    seen, _ = run_old_api(sampler, epochs=3)
    history = sampler.curriculum.history
    assert len(history) == 3 and sampler.curriculum.mu > 0
    draws = replay_history(history)
    for e, draw in enumerate(draws):
        steps = seen[e * (M // TBS) : (e + 1) * (M // TBS)]
        assert [r for rows in steps for r in rows] == draw
        rows = [r for rows in steps for r in rows]
        assert history[e]["acc"] == pytest.approx(np.mean([verdict(r, j) for r in rows for j in range(N_GEN)]))
        assert history[e]["ang"] == pytest.approx(np.mean([angle(r, j) for r in rows for j in range(N_GEN)]))


def test_old_api_resume_through_dataloader_state():
    cls = gverl.make_curriculum_sampler_class(AbstractCurriculumSampler)
    full = cls(data_source=list(range(N_ROWS)), data_config=old_api_config())
    seen_full, _ = run_old_api(full, epochs=3)
    for stop in (3, 4):  # after the first step of epoch 1 (mid-epoch), after the last step of epoch 1 (boundary)
        first = cls(data_source=list(range(N_ROWS)), data_config=old_api_config())
        seen_a, state = run_old_api(first, epochs=3, stop_after=stop)
        resumed = cls(data_source=list(range(N_ROWS)), data_config=old_api_config())  # a fresh process
        seen_b, _ = run_old_api(resumed, epochs=3 - stop // (M // TBS), start_state=state)
        assert seen_a + seen_b == seen_full
        assert resumed.curriculum.history == full.curriculum.history


def test_old_api_errors():
    cls = gverl.make_curriculum_sampler_class(AbstractCurriculumSampler)
    with pytest.raises(ValueError, match="multiple of data.train_batch_size"):
        cls(data_source=list(range(N_ROWS)), data_config=old_api_config(samples_per_epoch=6))
    with pytest.raises(ValueError, match="unknown keys"):
        cls(data_source=list(range(N_ROWS)), data_config=old_api_config(sigmaa=1.0))
    sampler = cls(data_source=list(range(N_ROWS)), data_config=old_api_config())
    list(sampler)
    batch = DataProto({"token_level_scores": torch.ones(2, 3)}, {"uid": np.array(["a", "a"], dtype=object)})
    with pytest.raises(RuntimeError, match="gainrl_causal"):
        sampler.update(batch=batch)
    acc_only = cls(data_source=list(range(N_ROWS)), data_config=old_api_config(use_angle=False))
    acc_only.update(batch=batch)
    assert acc_only.curriculum.pending[:2] == [2.0, 2.0]
    with pytest.raises(ValueError, match="0/1"):
        acc_only.update(batch=DataProto({"x": torch.ones(2)}, {"uid": np.array(["a", "a"], dtype=object),
                                                              "acc": np.array([0.5, 1.0])}))


# ======================================================================================================================
# verl 0.9 V1: custom_sampler (ReplayBuffer) + custom_cls (RLHFDataset) + checkpoint_callback_class
# ======================================================================================================================


@pytest.fixture
def fake_tq(monkeypatch):
    tq = FakeTransferQueue()
    monkeypatch.setitem(sys.modules, "transfer_queue", tq)
    SHARED_CURRICULA.clear()
    RLHFDataset.FILES = {
        "train.parquet": [{"row": i, "prompt": f"q{i}"} for i in range(N_ROWS)],
        "val.parquet": [{"row": 100 + i, "prompt": f"v{i}"} for i in range(5)],
    }
    yield tq
    SHARED_CURRICULA.clear()


def v1_kwargs(**overrides):
    kw = dict(order=ORDER, samples_per_epoch=M, sigma=SIGMA, seed=SEED, **MU)
    kw.update(overrides)
    return kw


def run_v1(tq, ckpt_dir: Path, steps: int, sampler_kwargs: dict, workers: int = 0, start_step: int = 1,
           feed_angles: bool = False, save_freq: int = 0):
    """verl 0.9.1 PPOTrainerSync.fit, reduced to the calls that touch our plug-ins."""
    Buffer = gverl.make_replay_buffer_class(ReplayBuffer)
    Dataset = gverl.make_dataset_class(RLHFDataset)
    Callback = gverl.make_checkpoint_callback_class(CheckpointCallback)
    # PPOTrainer.__init__ -> _build_replay_buffer (custom sampler gets these kwargs only)
    buffer = Buffer(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                    max_off_policy_strategy="drop", sampler_kwargs=sampler_kwargs, refill_fn=lambda n: None)
    callback = Callback(config=None)
    # init() -> _init_dataloader: create_rl_dataset(train / val) with data.custom_cls, StatefulDataLoader
    data_cfg = {"train_files": "train.parquet", "val_files": "val.parquet", "train_batch_size": TBS}
    train = Dataset(data_files="train.parquet", tokenizer=None, config=data_cfg, processor=None, max_samples=-1)
    val = Dataset(data_files="val.parquet", tokenizer=None, config=data_cfg, processor=None, max_samples=-1)
    assert len(train) == buffer.curriculum.m and len(val) == 5 and val[0]["row"] == 100
    loader = DataLoader(train, batch_size=TBS, sampler=SequentialSampler(train), drop_last=True,
                        collate_fn=list, num_workers=workers)
    trainer = SimpleNamespace(replay_buffer=buffer)
    # _load_checkpoint: data.pt restores the loader position (SequentialSampler is not Stateful: fast-forward)
    it = None
    skip = (start_step - 1) % (M // TBS)
    if skip:
        it = iter(loader)
        for _ in range(skip):
            next(it)
    fetched = []
    for step in range(start_step, start_step + steps):
        # prepare_step -> _add_batch_to_generate -> _fetch_one_gen_batch
        try:
            if it is None:
                raise StopIteration
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        rows = [item["row"] for item in batch]
        fetched.append(rows)
        # rollouts land in the transfer queue: prompt groups + trajectories with rm_scores
        for p, r in enumerate(rows):
            uid = f"s{step}p{p}"
            tq.kv_batch_put([uid], "train", tags=[{"is_prompt": True, "status": "finished", "order": p}])
            keys = [f"{uid}_{j}_0" for j in range(N_GEN)]
            scores = [torch.tensor([0.0, 0.0, verdict(r, j)]) for j in range(N_GEN)]
            tq.kv_batch_put(keys, "train", fields={"rm_scores": scores}, tags=[{"row": r, "j": j}
                                                                               for j in range(N_GEN)])
        sampled, metrics = buffer.sample(global_steps=step, partition_id="train", batch_size=TBS)
        assert len(sampled.keys) == TBS * N_GEN and "gainrl/mu" in metrics
        if feed_angles:  # a trainer that measured C_causal in the actor's old-log-prob forward
            buffer.record_angles([angle(t["row"], t["j"]) for t in sampled.tags])
        if save_freq and step % save_freq == 0:
            folder = ckpt_dir / f"global_step_{step}"
            callback.on_save(trainer=trainer, global_step=step, checkpoint_dir=str(folder))
            (ckpt_dir / "latest_checkpointed_iteration.txt").write_text(str(step))
        tq.kv_clear(keys=sampled.keys, partition_id="train")
    return buffer, fetched


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "2-loader-workers"])
@pytest.mark.parametrize("feed_angles", [False, True], ids=["accuracy-only", "with-angles"])
def test_v1_plugins_draw_prompts_and_update_mu(fake_tq, tmp_path, workers, feed_angles):
    buffer, fetched = run_v1(fake_tq, tmp_path, steps=3 * M // TBS, workers=workers, feed_angles=feed_angles,
                             sampler_kwargs=v1_kwargs(use_angle=feed_angles))
    history = buffer.curriculum.history
    assert len(history) == 3 and buffer.curriculum.mu > 0
    draws = replay_history(history, use_angle=feed_angles)
    per_epoch = M // TBS
    for e, draw in enumerate(draws):
        rows = [r for step in fetched[e * per_epoch : (e + 1) * per_epoch] for r in step]
        assert rows == draw  # the prompts verl generated for are our Gaussian draw, in rank order
        assert history[e]["acc"] == pytest.approx(np.mean([verdict(r, j) for r in rows for j in range(N_GEN)]))
        if feed_angles:
            assert history[e]["ang"] == pytest.approx(np.mean([angle(r, j) for r in rows for j in range(N_GEN)]))


@pytest.mark.parametrize("stop", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_v1_resume_from_checkpoint_callback_state(fake_tq, tmp_path, stop):
    full, fetched_full = run_v1(fake_tq, tmp_path / "a", steps=6, sampler_kwargs=v1_kwargs(use_angle=True),
                                feed_angles=True)
    SHARED_CURRICULA.clear()
    _, fetched_a = run_v1(fake_tq, tmp_path / "b", steps=stop, sampler_kwargs=v1_kwargs(use_angle=True),
                          feed_angles=True, save_freq=1)
    assert (tmp_path / "b" / f"global_step_{stop}" / gverl.STATE_FILE).exists()
    SHARED_CURRICULA.clear()
    resumed, fetched_b = run_v1(fake_tq, tmp_path / "c", steps=6 - stop, start_step=stop + 1, feed_angles=True,
                                sampler_kwargs=v1_kwargs(use_angle=True, restore_from=str(tmp_path / "b")))
    assert fetched_a + fetched_b == fetched_full
    assert resumed.curriculum.history == full.curriculum.history


def test_v1_errors(fake_tq, tmp_path):
    Dataset = gverl.make_dataset_class(RLHFDataset)
    cfg = {"train_files": "train.parquet"}
    with pytest.raises(RuntimeError, match="GainRLReplayBuffer"):
        Dataset(data_files="train.parquet", tokenizer=None, config=cfg)
    with pytest.raises(ValueError, match="multiple of data.train_batch_size"):
        run_v1(fake_tq, tmp_path, steps=1, sampler_kwargs=v1_kwargs(samples_per_epoch=6))
    Callback = gverl.make_checkpoint_callback_class(CheckpointCallback)
    with pytest.raises(RuntimeError, match="not a GainRLReplayBuffer"):
        Callback().on_save(trainer=SimpleNamespace(replay_buffer=object()), global_step=1, checkpoint_dir=str(tmp_path))


def test_verl_classes_need_verl():
    """Without verl the module imports fine, and the verl-based classes say what is missing."""
    try:
        import verl  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs verl"):
            gverl.GainRLReplayBuffer  # noqa: B018
    else:  # pragma: no cover - only where verl is installed
        assert issubclass(gverl.GainRLReplayBuffer, __import__(
            "verl.trainer.ppo.v1.replay_buffer", fromlist=["ReplayBuffer"]).ReplayBuffer)
