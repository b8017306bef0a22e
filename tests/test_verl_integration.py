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
  sync trainer's loop (fetch one batch per step, re-iterating the loader at StopIteration; sample; save; clear);
* verl 0.9.1's actor path for the old log-probs (section "actor angles" below): ``PPOTrainer._init_resource_pool_mgr``
  / ``_compute_old_log_prob`` (``verl/trainer/ppo/v1/trainer_base.py``), the TransferQueue dispatch of
  ``compute_log_prob`` (``verl/utils/transferqueue_utils.py``), ``ActorRolloutRefWorker`` / ``TrainingWorker``
  (``verl/workers/engine_workers.py``), ``FSDPEngineWithLMHead`` (``verl/workers/engine/fsdp/transformer_impl.py``) and
  ``prepare_micro_batches`` / ``postprocess_batch_func`` (``verl/workers/engine/utils.py``). The model in that path is
  a real tiny Hugging Face decoder, so the angle probe really runs.
"""
from __future__ import annotations

import enum
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
            if tags is not None or "tag" not in entry:  # a put of fields only keeps the tag
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


def next_gen_batch(it, new_iter):
    """verl's ``_fetch_one_gen_batch``: ``(iterator, next batch)``, starting a new pass (``new_iter()``) when the
    current one is exhausted or there is none yet."""
    if it is not None:
        try:
            return it, next(it)
        except StopIteration:
            pass
    it = new_iter()
    return it, next(it)


def put_rollouts(tq, step: int, rows: list[int], **fields) -> None:
    """The rollouts of one step landing in TransferQueue: per prompt row a finished prompt group and N_GEN
    trajectories whose fields are ``fields[name](row, j)``."""
    for p, r in enumerate(rows):
        uid = f"s{step}p{p}"
        tq.kv_batch_put([uid], "train", tags=[{"is_prompt": True, "status": "finished", "order": p}])
        keys = [f"{uid}_{j}_0" for j in range(N_GEN)]
        tq.kv_batch_put(keys, "train", fields={name: [fn(r, j) for j in range(N_GEN)] for name, fn in fields.items()},
                        tags=[{"row": r, "j": j} for j in range(N_GEN)])


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
        it, batch = next_gen_batch(it, lambda: iter(loader))
        rows = [item["row"] for item in batch]
        fetched.append(rows)
        put_rollouts(tq, step, rows, rm_scores=lambda r, j: torch.tensor([0.0, 0.0, verdict(r, j)]))
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


# ======================================================================================================================
# verl 0.9.1 V1 actor angles: STAND-INS of the old-log-prob path (written for this test; NOT verl code)
# ======================================================================================================================


@dataclass
class NonTensorData:
    """Stand-in: tensordict.NonTensorData."""

    data: Any


class TensorDictLite:
    """Stand-in: the part of tensordict.TensorDict the engine path uses: per-row jagged nested tensors
    (``input_ids`` / ``position_ids`` ``[B, j]``, real tokens only: verl's NO_PADDING mode), NonTensorData entries,
    ``batch_size``, row selection."""

    def __init__(self, fields: dict, batch_size: int):
        self.fields, self.batch_size = dict(fields), (batch_size,)

    def __len__(self):
        return self.batch_size[0]

    def __getitem__(self, key):
        return self.fields[key]

    def __setitem__(self, key, value):
        self.fields[key] = value

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def keys(self):
        return self.fields.keys()

    def items(self):
        return self.fields.items()

    def rows(self, idx: list[int]) -> "TensorDictLite":
        out = {k: (torch.nested.as_nested_tensor([v.unbind()[i] for i in idx], layout=torch.jagged)
                   if isinstance(v, torch.Tensor) else v) for k, v in self.fields.items()}
        return TensorDictLite(out, len(idx))

    def to(self, device):
        return self

    def cpu(self):
        return self


def nt_get(data, key, default):
    """Stand-in: verl.utils.tensordict_utils.get_non_tensor_data."""
    value = data.get(key, default)
    return value.data if isinstance(value, NonTensorData) else value


def prepare_micro_batches(data):
    """Stand-in: verl.workers.engine.utils.prepare_micro_batches: with use_dynamic_bsz, rows regrouped under a token
    budget (returns the index groups); else consecutive chunks of micro_batch_size_per_gpu (indices None)."""
    n = len(data)
    if nt_get(data, "use_dynamic_bsz", True):
        lens = data["input_ids"].offsets().diff().tolist()
        k = max(1, -(-sum(lens) // nt_get(data, "max_token_len_per_gpu", None)))
        order = sorted(range(n), key=lambda i: -lens[i])
        groups = [order[g::k] for g in range(k) if order[g::k]]
        return [data.rows(g) for g in groups], groups
    size = nt_get(data, "micro_batch_size_per_gpu", None)
    return [data.rows(list(range(i, min(i + size, n)))) for i in range(0, n, size)], None


def postprocess_batch_func(output_lst, indices, data):
    """Stand-in: verl.workers.engine.utils.postprocess_batch_func (+ seqlen_balancing.restore_dynamic_batch)."""
    model_output: dict[str, list] = {}
    for o in output_lst:
        for key, val in o["model_output"].items():
            model_output.setdefault(key, []).append(val)
    for key, vals in model_output.items():
        rows = [t for nt in vals for t in nt.unbind()]
        if indices is not None:
            flat = [i for g in indices for i in g]
            reverse = [flat.index(i) for i in range(len(flat))]
            rows = [rows[i] for i in reverse]
        model_output[key] = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    return {"model_output": model_output, "loss": [o["loss"] for o in output_lst], "metrics": {}}


class FSDPEngineWithLMHead:
    """Stand-in: verl 0.9.1 FSDPEngineWithLMHead (verl/workers/engine/fsdp/transformer_impl.py): BaseEngine.infer_batch
    (no_grad forward_backward_batch), FSDPEngine.forward_backward_batch (micro-batches -> forward_step ->
    postprocess), forward_step (prepare_model_inputs -> self.module(**inputs, use_cache=False) ->
    prepare_model_outputs) and the NO_PADDING branches of prepare_model_inputs / prepare_model_outputs: remove-padding
    = one packed [1, T] row (position ids restart per sequence, static bucket pad appended with positions 0..pad-1,
    attention_mask None); padded = [B, L] right-padded rows with the [B, L] int32 mask. Temperature 1, no Ulysses."""

    use_ulysses_sp = False

    def __init__(self, module, pad_to_length_bucket: int = 0):
        self.module, self.pad_to_length_bucket = module, pad_to_length_bucket

    def infer_batch(self, data, loss_function=None):
        with torch.no_grad():
            return self.forward_backward_batch(data, loss_function, forward_only=True)

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        micro_batches, indices = prepare_micro_batches(data)
        output_lst = [self.forward_step(mb, loss_function, forward_only)[1] for mb in micro_batches]
        return postprocess_batch_func(output_lst, indices, data)

    def forward_step(self, micro_batch, loss_function, forward_only):
        micro_batch = micro_batch.to("cpu")
        model_inputs, output_args = self.prepare_model_inputs(micro_batch=micro_batch)
        raw_output = self.module(**model_inputs, use_cache=False)
        model_output = self.prepare_model_outputs(output=raw_output, output_args=output_args, micro_batch=micro_batch,
                                                  logits_processor_func=loss_function)
        return torch.tensor(1.0), {"model_output": model_output, "loss": 1.0, "metrics": {}}

    def prepare_model_inputs(self, micro_batch):
        input_ids, position_ids = micro_batch["input_ids"], micro_batch["position_ids"]
        if nt_get(micro_batch, "use_remove_padding", True):
            ids, pos = input_ids.values().unsqueeze(0), position_ids.values().unsqueeze(0)
            rolled = torch.roll(ids, shifts=-1, dims=1).squeeze(0)
            bucket = self.pad_to_length_bucket
            pad = -(-ids.shape[1] // bucket) * bucket - ids.shape[1] if bucket else 0
            if pad:
                ids = torch.nn.functional.pad(ids, (0, pad))
                pos = torch.cat([pos, torch.arange(pad).unsqueeze(0)], dim=-1)
            return ({"input_ids": ids, "attention_mask": None, "position_ids": pos},
                    {"input_ids_rmpad_rolled": rolled, "pad_size": pad})
        n, lens = len(micro_batch), input_ids.offsets().diff()
        width = int(lens.max().item())
        ids = torch.nested.to_padded_tensor(input_ids, padding=2, output_size=(n, width))
        pos = torch.nested.to_padded_tensor(position_ids, padding=0, output_size=(n, width))
        mask = (torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)).to(torch.int32)
        return ({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                {"input_ids_rmpad_rolled": torch.roll(input_ids.values(), shifts=-1, dims=0)})

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        input_ids = micro_batch["input_ids"]
        cu_seqlens = input_ids.offsets()
        if nt_get(micro_batch, "use_remove_padding", True):
            logits = output.logits.squeeze(0)
            logits = logits[: logits.shape[0] - output_args["pad_size"]]
        else:
            logits = torch.cat([output.logits[b, :n] for b, n in enumerate(cu_seqlens.diff().tolist())])
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, output_args["input_ids_rmpad_rolled"][:, None])
        return {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs[:, 0], cu_seqlens)}


class TrainingWorker:
    """Stand-in: verl 0.9.1 TrainingWorker (verl/workers/engine_workers.py): builds its engine in __init__
    (EngineRegistry.new); infer_batch fills the engine defaults (use_remove_padding, use_dynamic_bsz, token budget /
    micro-batch size) when absent, runs engine.infer_batch and returns model_output + metrics as a TensorDict."""

    def __init__(self, config):
        self.config = config
        self.engine = FSDPEngineWithLMHead(config["module"], config.get("pad_to_length_bucket", 0))

    def infer_batch(self, data):
        defaults = dict(use_remove_padding=self.config["use_remove_padding"],
                        use_dynamic_bsz=self.config["use_dynamic_bsz"], max_token_len_per_gpu=24,
                        micro_batch_size_per_gpu=2)
        for key, val in defaults.items():
            if key not in data.keys():
                data[key] = NonTensorData(val)
        output = self.engine.infer_batch(data, loss_function=None)
        return TensorDictLite({**output["model_output"], "metrics": NonTensorData({})}, len(data))


class ActorRolloutRefWorker:
    """Stand-in: verl 0.9.1 ActorRolloutRefWorker (verl/workers/engine_workers.py): class attributes
    ``actor_worker_cls`` / ``ref_worker_cls``; init_model builds ``self.actor = self.actor_worker_cls(config=...)``;
    ``compute_log_prob(data) = self.actor.infer_batch(data).cpu()``."""

    actor_worker_cls = TrainingWorker
    ref_worker_cls = TrainingWorker

    def __init__(self, config, role):
        self.config, self.role = config, role

    def init_model(self):
        self.actor = self.actor_worker_cls(config=self.config)

    def compute_log_prob(self, data):
        return self.actor.infer_batch(data).cpu()


class Role(enum.Enum):
    """Stand-in: verl.trainer.ppo.utils.Role (the members used here)."""

    ActorRollout = 2
    RefPolicy = 4
    ActorRolloutRef = 6


class FakeRay(types.ModuleType):
    """Stand-in: ``ray.remote(cls)`` -> an actor class exposing ``__ray_actor_class__`` (as verl reads it)."""

    def __init__(self):
        super().__init__("ray")

    @staticmethod
    def remote(cls):
        return SimpleNamespace(__ray_actor_class__=cls)


class ActorWorkerGroup:
    """Stand-in: the actor RayWorkerGroup with TransferQueue dispatch (make_nd_compute_dataproto_dispatch_fn +
    verl/utils/transferqueue_utils.py): the KVBatchMeta is split over the DP ranks in order; each rank reads its rows
    from TransferQueue with the meta's ``extra_info`` as NonTensorData; every tensor field of the output is written
    back to TransferQueue under the same keys."""

    def __init__(self, remote_cls, config, dp: int):
        self.workers = [remote_cls.__ray_actor_class__(config=config, role="actor_rollout") for _ in range(dp)]

    def init_model(self):
        for worker in self.workers:
            worker.init_model()

    def compute_log_prob(self, meta):
        import copy

        import transfer_queue as tq

        per_rank = -(-len(meta.keys) // len(self.workers))
        for rank, worker in enumerate(self.workers):
            keys = meta.keys[rank * per_rank : (rank + 1) * per_rank]
            rows = tq.kv_batch_get(keys=keys, partition_id=meta.partition_id, select_fields=["input_ids"])["input_ids"]
            data = TensorDictLite({
                "input_ids": torch.nested.as_nested_tensor(rows, layout=torch.jagged),
                "position_ids": torch.nested.as_nested_tensor([torch.arange(len(r)) for r in rows],
                                                              layout=torch.jagged),
            }, len(keys))
            for key, val in copy.deepcopy(meta.extra_info).items():
                data[key] = NonTensorData(val)
            out = worker.compute_log_prob(data)
            fields = {k: list(v.unbind()) for k, v in out.items() if isinstance(v, torch.Tensor)}
            tq.kv_batch_put(keys=keys, partition_id=meta.partition_id, fields=fields)
        return meta


class PPOTrainerSync:
    """Stand-in: verl 0.9.1 V1 PPOTrainer / PPOTrainerSync (verl/trainer/ppo/v1/trainer_base.py), reduced to what the
    angle path touches: ``__init__`` builds the custom replay buffer with ``refill_fn=self._add_prompts_to_generate``;
    ``init()`` -> ``_init_resource_pool_mgr`` (``role_worker_mapping[Role.ActorRollout] =
    ray.remote(ActorRolloutRefWorker)``) -> actor worker group -> ``init_model``; ``_step_once``:
    ``replay_buffer.sample`` -> ``_balance_batch`` (appends ``is_padding`` no-op trajectories, reorders) -> ``_compute_old_log_prob`` (the real
    data flow: ``extra_info`` calculate_entropy / compute_loss / temperature, ``actor_rollout_wg.compute_log_prob``,
    ``kv_batch_get(log_probs)`` -> ``kv_batch_put(old_log_probs)``) -> the reference pass (LoRA: the actor again, with
    ``no_lora_adapter``); ``fit`` clears the batch's keys after every step."""

    def __init__(self, config, buffer_cls):
        self.config = config
        self.replay_buffer = buffer_cls(
            trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None, max_off_policy_strategy="drop",
            sampler_kwargs=config["sampler_kwargs"], refill_fn=self._add_prompts_to_generate)
        self.ref_extra_info: list[dict] = []

    def _add_prompts_to_generate(self, num_prompts):
        return num_prompts

    def init(self):
        self._init_resource_pool_mgr()
        self.actor_rollout_wg = ActorWorkerGroup(self.role_worker_mapping[Role.ActorRollout], self.config["worker"],
                                                 dp=2)
        self.actor_rollout_wg.init_model()

    def _init_resource_pool_mgr(self):
        self.role_worker_mapping = {Role.ActorRollout: sys.modules["ray"].remote(ActorRolloutRefWorker)}

    def _balance_batch(self, batch):
        import transfer_queue as tq

        pads = [f"pad{i}_0_0" for i in range(2)]
        tq.kv_batch_put(pads, batch.partition_id, fields={"input_ids": [torch.tensor([5, 6, 7])] * 2},
                        tags=[{"is_padding": True}] * 2)
        keys, tags = batch.keys + pads, batch.tags + [{"is_padding": True}] * 2
        order = list(reversed(range(len(keys))))
        return KVBatchMeta(batch.partition_id, [keys[i] for i in order], [tags[i] for i in order],
                           dict(batch.extra_info))

    def _compute_old_log_prob(self, batch, metrics):
        import transfer_queue as tq

        batch.extra_info.update({"calculate_entropy": True, "compute_loss": False, "temperature": 1.0})
        output = self.actor_rollout_wg.compute_log_prob(batch)
        assert len(output) == len(batch)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["log_probs"])
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields={"old_log_probs": data["log_probs"]})
        return batch

    def _compute_ref_log_prob(self, batch, metrics):
        batch.extra_info.update({"calculate_entropy": False, "compute_loss": False, "no_lora_adapter": True})
        self.ref_extra_info.append(dict(batch.extra_info))
        return batch

    def _step_once(self, metrics):
        batch, sample_metrics = self.replay_buffer.sample(global_steps=0, partition_id="train", batch_size=TBS)
        metrics.update(sample_metrics)
        batch.extra_info["temperature"] = 1.0
        batch = self._balance_batch(batch)
        batch = self._compute_old_log_prob(batch, metrics=metrics)
        return self._compute_ref_log_prob(batch, metrics=metrics)


@pytest.fixture
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def policy():
    pytest.importorskip("transformers")
    from tiny_models import tiny_lm

    return tiny_lm("qwen2")


def trajectory(row: int, j: int) -> torch.Tensor:
    """Token ids of trajectory j of a prompt: prompt + response, 4..12 real tokens."""
    g = torch.Generator().manual_seed(1000 * row + j)
    return torch.randint(3, 400, (3 + row % 5 + 1 + (row + j) % 4,), generator=g)


def reference_causal(model, ids: torch.Tensor) -> float:
    """float64 C_causal (DESIGN.md §1) of the last decoder layer's MLP input, from a plain forward of ``ids`` alone."""
    captured = []
    handle = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        handle.remove()
    h = captured[0][0].double()
    u = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s, n = u.sum(0), u.shape[0]
    return float((s @ s - (u * u).sum()) / (n * (n - 1)))


def engine_data(seqs, request=None) -> TensorDictLite:
    data = TensorDictLite({
        "input_ids": torch.nested.as_nested_tensor(seqs, layout=torch.jagged),
        "position_ids": torch.nested.as_nested_tensor([torch.arange(len(s)) for s in seqs], layout=torch.jagged),
    }, len(seqs))
    if request is not None:
        data[gverl.ANGLE_REQUEST] = NonTensorData(request)
    return data


@pytest.mark.parametrize("layout", [(True, True, 0), (True, False, 8), (False, True, 0), (False, False, 0)],
                         ids=["rmpad-dynbsz", "rmpad-microbsz-staticpad", "padded-dynbsz", "padded-microbsz"])
def test_actor_engine_measures_causal_in_log_prob_forward(policy, one_torch_thread, layout):
    """GainRLTrainingWorker's engine returns per-sequence C_causal (= the float64 reference of a plain forward over
    each sequence) in the input order, in verl's layouts; log-probs are untouched; without the request nothing is
    measured."""
    rmpad, dynbsz, bucket = layout
    cfg = {"module": policy, "use_remove_padding": rmpad, "use_dynamic_bsz": dynbsz, "pad_to_length_bucket": bucket}
    seqs = [trajectory(r, j) for r, j in [(0, 0), (3, 1), (7, 0), (2, 1), (9, 1)]]
    stock = TrainingWorker(cfg).infer_batch(engine_data(seqs))
    worker = gverl.make_angle_training_worker_class(TrainingWorker)(cfg)
    assert isinstance(worker.engine, FSDPEngineWithLMHead) and type(worker.engine) is not FSDPEngineWithLMHead

    plain = worker.infer_batch(engine_data(seqs))  # no request: as stock, no probe built
    assert set(plain.keys()) == {"log_probs", "metrics"} and "_gainrl_probes" not in vars(worker.engine)
    out = worker.infer_batch(engine_data(seqs, request={"layer": -1, "backend": "torch"}))
    causal = out[gverl.DEFAULT_ANGLE_KEY]
    assert causal.is_nested and [t.shape for t in causal.unbind()] == [torch.Size([1])] * len(seqs)
    expected = [reference_causal(policy, s) for s in seqs]
    np.testing.assert_allclose(causal.values().double().numpy(), expected, rtol=0, atol=2e-6)
    for got in (plain, out):
        for a, b in zip(got["log_probs"].unbind(), stock["log_probs"].unbind(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    probe = next(iter(vars(worker.engine)["_gainrl_probes"].values()))
    captures = probe.captures
    worker.infer_batch(engine_data(seqs))  # the probe stays off outside a requested pass
    assert probe.captures == captures and worker.engine._gainrl_probe is None


def test_actor_engine_refusals(policy):
    cfg = {"module": policy, "use_remove_padding": True, "use_dynamic_bsz": True}
    worker = gverl.make_angle_training_worker_class(TrainingWorker)(cfg)
    worker.engine.use_ulysses_sp = True
    with pytest.raises(NotImplementedError, match="Ulysses"):
        worker.infer_batch(engine_data([trajectory(0, 0)], request={"layer": -1, "backend": "torch"}))

    class MegatronLikeWorker(TrainingWorker):
        def __init__(self, config):
            self.config, self.engine = config, object()

    with pytest.raises(NotImplementedError, match="FSDP engine"):
        gverl.make_angle_training_worker_class(MegatronLikeWorker)(cfg)


def run_v1_trainer(tq, model, steps: int, sampler_kwargs: dict, monkeypatch, trainer_cls=PPOTrainerSync):
    """The V1 sync loop with the stand-in trainer: fetch -> roll out into TransferQueue -> _step_once -> clear."""
    monkeypatch.setitem(sys.modules, "ray", FakeRay())
    monkeypatch.setitem(vars(gverl), "GainRLActorRolloutRefWorker", gverl.make_angle_worker_class(
        ActorRolloutRefWorker, gverl.make_angle_training_worker_class(TrainingWorker)))  # (verl builds it from its own)
    trainer = trainer_cls({"sampler_kwargs": sampler_kwargs, "worker": {
        "module": model, "use_remove_padding": True, "use_dynamic_bsz": True}}, gverl.make_replay_buffer_class(
        ReplayBuffer))
    data_cfg = {"train_files": "train.parquet", "val_files": "val.parquet", "train_batch_size": TBS}
    train = gverl.make_dataset_class(RLHFDataset)(data_files="train.parquet", tokenizer=None, config=data_cfg)
    trainer.init()
    it, fetched, step_metrics = None, [], []
    for step in range(1, steps + 1):
        it, batch = next_gen_batch(
            it, lambda: iter(DataLoader(train, batch_size=TBS, sampler=SequentialSampler(train), collate_fn=list)))
        rows = [item["row"] for item in batch]
        fetched.append(rows)
        put_rollouts(tq, step, rows, rm_scores=lambda r, j: torch.tensor([0.0, verdict(r, j)]), input_ids=trajectory)
        metrics: dict = {}
        batch_meta = trainer._step_once(metrics)
        step_metrics.append(metrics)
        tq.kv_clear(keys=batch_meta.keys, partition_id="train")
    return trainer, fetched, step_metrics


def test_v1_actor_angles_flow_into_mu(fake_tq, policy, one_torch_thread, monkeypatch):
    """sampler_kwargs.actor_angles: the actor measures C_causal in its old-log-prob forward; the epoch's ang is the
    mean of the float64 references over exactly its real trajectories, and μ moves as DESIGN.md §2 says."""
    trainer, fetched, step_metrics = run_v1_trainer(fake_tq, policy, 3 * M // TBS,
                                                    v1_kwargs(actor_angles=True, probe_backend="torch"), monkeypatch)
    assert type(trainer).__name__ == "GainRLAnglePPOTrainerSync" and isinstance(trainer, PPOTrainerSync)
    worker = trainer.actor_rollout_wg.workers[0]
    assert type(worker).__name__ == "GainRLActorRolloutRefWorker" and isinstance(worker, ActorRolloutRefWorker)
    assert worker.ref_worker_cls is TrainingWorker  # the reference model is not touched
    assert all(gverl.ANGLE_REQUEST not in info for info in trainer.ref_extra_info)  # nor measured (LoRA ref pass)
    assert all("gainrl/mu" in m for m in step_metrics)
    history = trainer.replay_buffer.curriculum.history
    assert len(history) == 3 and trainer.replay_buffer.curriculum.use_angle
    draws = replay_history(history)
    per_epoch = M // TBS
    for e, draw in enumerate(draws):
        rows = [r for step in fetched[e * per_epoch : (e + 1) * per_epoch] for r in step]
        assert rows == draw
        assert history[e]["n_ang"] == len(rows) * N_GEN  # padding trajectories left out
        assert history[e]["acc"] == pytest.approx(np.mean([verdict(r, j) for r in rows for j in range(N_GEN)]))
        ang = np.mean([reference_causal(policy, trajectory(r, j)) for r in rows for j in range(N_GEN)])
        assert history[e]["ang"] == pytest.approx(ang, abs=1e-6)
        assert history[e]["ang"] != 0.0


def test_v1_without_actor_angles_nothing_changes(fake_tq, policy, one_torch_thread, monkeypatch, tmp_path):
    """Without actor_angles the trainer, its workers and their outputs are verl's own, and the μ history is the one
    of the accuracy-only loop."""
    trainer, fetched, _ = run_v1_trainer(fake_tq, policy, 3 * M // TBS, v1_kwargs(), monkeypatch)
    assert type(trainer) is PPOTrainerSync
    assert type(trainer.actor_rollout_wg.workers[0]) is ActorRolloutRefWorker
    assert type(trainer.actor_rollout_wg.workers[0].actor.engine) is FSDPEngineWithLMHead
    assert not any(gverl.DEFAULT_ANGLE_KEY in entry for entry in fake_tq.store.values())
    SHARED_CURRICULA.clear()
    plain, fetched_plain = run_v1(fake_tq, tmp_path, steps=3 * M // TBS, sampler_kwargs=v1_kwargs())
    assert fetched == fetched_plain and trainer.replay_buffer.curriculum.history == plain.curriculum.history


def test_v1_actor_angles_errors(fake_tq, policy, monkeypatch):
    Buffer = gverl.make_replay_buffer_class(ReplayBuffer)
    with pytest.raises(ValueError, match="use_angle: false"):
        PPOTrainerSync({"sampler_kwargs": v1_kwargs(actor_angles=True, use_angle=False)}, Buffer)
    SHARED_CURRICULA.clear()
    with pytest.raises(RuntimeError, match="V1 PPOTrainer"):  # not built by a verl trainer
        Buffer(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None, max_off_policy_strategy="drop",
               sampler_kwargs=v1_kwargs(actor_angles=True), refill_fn=lambda n: None)
    SHARED_CURRICULA.clear()

    class BypassTrainer(PPOTrainerSync):  # rollout_correction.bypass_mode: no old-log-prob forward at all
        def _compute_old_log_prob(self, batch, metrics):
            return batch

    with pytest.raises(RuntimeError, match="bypass_mode"):
        run_v1_trainer(fake_tq, policy, 1, v1_kwargs(actor_angles=True, probe_backend="torch"), monkeypatch,
                       trainer_cls=BypassTrainer)
