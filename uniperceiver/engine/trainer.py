"""The multi-task trainer: unmixed task sampling, DDP, AMP, clipping, checkpoints, logs.

Read `Trainer.train_step` top to bottom: it is one iteration of the release's recipe
(OFFICIAL.md 5-6): every rank draws its own task, encodes the target sets it needs (sliced ones
on every rank, joined by a differentiable all-gather), computes its weighted task loss, and DDP
averages the gradients.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from moe.losses import weighted_aux_loss

from .. import distributed as du
from ..config import ConfigError, RunConfig, TaskConfig, dump_yaml, resolve_path, to_dict
from ..data import build_dataset, build_mixup, build_target_set, check_reader_options, make_collate
from ..modeling.batch import TargetSet, TaskBatch
from ..modeling.checkpoint import load_state_dict_strict, load_weights
from ..modeling.adapter import adapter_tensor_names, base_fingerprint, write_adapter
from ..modeling.freezing import apply_trainable, is_prompt_only, trainable_substrings
from ..modeling.model import UniPerceiver
from ..tasks import TaskOutput, run_task, task_spec
from ..tokenization import ClipTokenizer
from ..utils.errors import RunFailure
from ..utils.io import load_checkpoint_file
from . import dcp
from . import fsdp as fsdp_lib
from .checkpoint import load_latest_checkpoint, prepare_checkpoint_dir, save_checkpoint
from .flops import encoder_flops, peak_flops
from .lock import OutputDirLock, OutputDirLockedError
from .logger import TrainLogger
from .optim import build_optimizer, build_scheduler, clip_grad_norm_, implementation_flags, keep_implementation
from .parallelize import (
    build_device_mesh,
    check_expert_parallel_size,
    clip_grad_norm,
    finish_expert_gradients,
    full_model_state_dict,
    full_optimizer_state_dict,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    shard_experts,
    wrap_ddp,
)
from .resume import apply_optim_config, config_changes, refuse, split_changes
from .sampler import DatasetSubset, StreamBatchSampler, TaskSampler, TaskStream, fraction_indices, mix_seed
from .watchdog import Watchdog

log = logging.getLogger("uniperceiver.train")


class NonFiniteLossError(RuntimeError, RunFailure):
    pass


class CollectiveError(RuntimeError, RunFailure):
    """A collective failed or timed out (a peer stopped or died); names the collective and step."""

    hard_exit = True


# fp16 loss scaling as the release (utils/misc.NativeScalerWithGradNormCount): start at 2^13 and
# grow after 200 clean steps; past iteration 5000, while the scale is below 2048, grow after 5.
LOSS_SCALE_INIT, LOSS_SCALE_WINDOW = 2.0**13, 200
LOSS_SCALE_RECOVERY = (5000, 2048.0, 5)  # (after step, below scale, growth interval)
# A skipped fp16 step counts towards train.max_nonfinite only when it was taken at this scale or
# below: above it, an overflow is what the scaler exists to absorb (it halves and retries), at 1.0
# the unscaled gradient itself is inf/nan.
LOSS_SCALE_FLOOR = 1.0


def loss_scale_growth_interval(step: int, scale: float) -> int:
    after, below, interval = LOSS_SCALE_RECOVERY
    return interval if step > after and scale < below else LOSS_SCALE_WINDOW


def _local_targets(target_set: TargetSet, sliced: bool) -> TargetSet:
    """The entries of a target set this rank encodes: all of them, or (sliced, several ranks)
    ceil(N/world) of them, the last slice padded with copies of entry 0 (OFFICIAL.md 3.3)."""
    world = du.world_size()
    if not sliced or world == 1:
        return target_set
    per_rank = math.ceil(len(target_set) / world)
    start = du.rank() * per_rank
    index = torch.arange(start, start + per_rank)
    index[index >= len(target_set)] = 0
    return TargetSet(target_set.name, target_set.ids_NL[index],
                     None if target_set.padding_mask_NL is None else target_set.padding_mask_NL[index],
                     target_set.attributes_SA, target_set.task_id)


def _join_slices(feats: Tensor, n: int, sliced: bool) -> Tensor:
    """Every rank's slice features joined with a differentiable all-gather, truncated to N."""
    if not sliced or du.world_size() == 1:
        return feats
    return torch.cat(torch.distributed.nn.functional.all_gather(feats), dim=0)[:n]


def encode_target_set(model: UniPerceiver, target_set: TargetSet, sliced: bool) -> Tensor:
    """Features [N, D] of a target set (sliced: each rank encodes its slice, see
    `_local_targets`, and the slices are all-gathered)."""
    feats = model.encode_targets(_local_targets(target_set, sliced))
    return _join_slices(feats, len(target_set), sliced)


def _same_sequence(a, b) -> bool:
    """The same sequence batch (the same segment tensors, routing rows and role), also when a
    task re-wraps it (e.g. retrieval encodes its captions with role='target')."""
    return a is b or (
        len(a.segments) == len(b.segments)
        and all(x is y for x, y in zip(a.segments, b.segments))
        and a.attributes_SA is b.attributes_SA
        and (a.task_id, a.caption_queries, a.role) == (b.task_id, b.caption_queries, b.role)
    )


class PreEncoded:
    """The model as a task sees it when the micro-step's sequences are already encoded (one
    joint call): `encode(seq)` returns that sequence's output, anything else is the model's.
    A task asking for a sequence that was not in the joint call is an error, never a second
    encoder call (ranks must run every MoE sublayer the same number of times)."""

    def __init__(self, model: UniPerceiver, encoded: list[tuple[Any, Any]]) -> None:
        self._model, self._encoded = model, encoded

    def encode(self, seq, **kwargs):
        for known, out in self._encoded:
            if _same_sequence(known, seq) and not kwargs.get("keep_kv") and kwargs.get("temporal_offsets") is None:
                return out
        raise RuntimeError("a task encoded a sequence outside the micro-step's joint encoder call")

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def other_ranks_features(feats_BD: Tensor) -> Tensor:
    """Every other rank's `feats_BD`, concatenated in rank order, without gradient."""
    with torch.no_grad():
        parts = [torch.empty_like(feats_BD) for _ in range(du.world_size())]
        torch.distributed.all_gather(parts, feats_BD.contiguous())
    me = du.rank()
    return torch.cat([p for i, p in enumerate(parts) if i != me])


class TrainStep(nn.Module):
    """Model + task loss as one module, so DDP sees a forward per iteration.

    `one_encoder_call`: the task's input (and target caption) sequences, its own target set and
    this rank's slice of every distributed target set go through the encoder in ONE call
    (`UniPerceiver.encode_many`); otherwise each is encoded separately (the former behaviour).
    `gather_negatives`: single-task retrieval training's other-rank negatives (`run_task`).
    """

    def __init__(self, model: UniPerceiver, one_encoder_call: bool = True, gather_negatives=None) -> None:
        super().__init__()
        self.model = model
        self.one_encoder_call = one_encoder_call
        self.gather_negatives = gather_negatives

    def forward(self, batch: TaskBatch, target_sets: dict[str, TargetSet], sliced: set[str]) -> tuple[Tensor, TaskOutput]:
        if self.one_encoder_call:
            feats, out = self._joint(batch, target_sets, sliced)
        else:
            feats = {name: encode_target_set(self.model, ts, name in sliced) for name, ts in target_sets.items()}
            out = run_task(self.model, batch, feats, gather_negatives=self.gather_negatives)
        routing = self.model.cfg.moe.routing
        if routing.load_balance_weight or routing.z_loss_weight:
            # Router aux losses come back with the decisions (never from module globals).
            aux = weighted_aux_loss((d for _, d in out.decisions), routing.load_balance_weight, routing.z_loss_weight)
            if aux is not None:
                out.losses["moe_aux"] = aux
        loss = out.loss
        # Keep every encoded set in the graph (0 x its sum): the all-gather's backward is a
        # collective every rank must join, whether or not its task used that set.
        unused = [f.sum() for name, f in feats.items() if name != batch.target_set]
        if unused:
            loss = loss + 0.0 * torch.stack(unused).sum()
        return loss, out

    def _joint(self, batch: TaskBatch, target_sets: dict[str, TargetSet], sliced: set[str]
               ) -> tuple[dict[str, Tensor], TaskOutput]:
        names = sorted(target_sets)
        local = {n: _local_targets(target_sets[n], n in sliced) for n in names}
        # Retrieval encodes its per-sample captions as targets (their own deep prompts).
        task_seqs = [batch.inputs] + ([replace(batch.targets, role="target")] if batch.targets is not None else [])
        seqs = [local[n].slice(0, len(local[n])) for n in names] + task_seqs
        joint = self.model.encode_many(seqs)
        feats = {}
        for n, enc in zip(names, joint.outputs):
            own = self.model.features(enc.hidden_BLD[:, 0])
            feats[n] = _join_slices(own, len(target_sets[n]), n in sliced)
        task_view = PreEncoded(self.model, list(zip(task_seqs, joint.outputs[len(names):])))
        out = run_task(task_view, batch, feats, gather_negatives=self.gather_negatives)  # type: ignore[arg-type]
        out.decisions = joint.decisions  # the whole call's decisions, every routed sublayer once
        out.extras["segment_tokens"] = torch.tensor(joint.segment_tokens)  # for parallelize.exchange_bytes
        return feats, out

def _is_collective_failure(exc: BaseException) -> bool:
    """torch.distributed raises DistError subclasses; some backends' timeouts still come as plain
    RuntimeErrors that name the backend or the timeout."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in ("gloo", "Gloo", "NCCL", "Timed out", "timed out", "Application timeout",
                                                                     "Connection reset", "Connection closed"))


def _forget_inherited_lock(lock_fd: int, lock_id: tuple[int, int], _worker_id: int) -> None:
    """DataLoader worker init: a forked worker drops its copy of the output-directory lock (or a
    kill -9 of the trainer would leave the lock held until the orphaned workers notice), and
    stops forwarding signals to the trainer's watchdog pipe."""
    import os
    import signal as _signal

    with contextlib.suppress(OSError, ValueError):
        _signal.set_wakeup_fd(-1)
    with contextlib.suppress(OSError):
        st = os.fstat(lock_fd)
        if (st.st_dev, st.st_ino) == lock_id:  # the inherited descriptor, not a reused number
            os.close(lock_fd)


@dataclass
class _TaskData:
    cfg: TaskConfig
    dataset: torch.utils.data.Dataset
    collate: Any
    stream: TaskStream
    mixup: Any = None  # Mixup/CutMix for classification (soft targets), or None
    iterator: Any = None  # made on first use (see _next_batch)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        tcfg = cfg.train
        cfg.check_data_paths("train")  # an unset $DATA_PATH or a mistyped reader option fails here,
        check_reader_options(cfg, "train")  # before any work
        device_type = du.pick_device_type(tcfg.device)
        self.info = du.init_distributed(device_type, timeout_s=tcfg.collective_timeout_s)
        self.rank, self.world = du.rank(), du.world_size()
        self.device = du.local_device(device_type)
        # Sizes that cannot divide: a ConfigError (exit 2) before anything is created or written.
        moe = cfg.model.moe
        check_expert_parallel_size(self.world, tcfg.expert_parallel_size,
                                   moe.routing.num_experts if moe.enabled else None)
        self.output_dir = Path(resolve_path(tcfg.output_dir))
        # Before anything is written there: one run per output directory.
        self.lock = OutputDirLock(self.output_dir)
        self._acquire_lock()
        self.data_root = cfg.resolved_data_root()
        self.tokenizer = ClipTokenizer()

        # Same initial weights on every rank (DDP also broadcasts), then per-rank randomness.
        torch.manual_seed(cfg.seed)
        self.model = UniPerceiver(cfg.model)
        if tcfg.init_from:
            # a model file, a training checkpoint or a sharded run's distributed checkpoint; a base
            # model starts a prompt-tuned one (its prompt tensors keep their initial values)
            load_weights(self.model, resolve_path(tcfg.init_from, self.data_root),
                         read_sharded=dcp.consolidate_model_state, allow_missing=is_prompt_only)
        # The freezing rule (prompt tuning), before DDP sees which parameters train.
        self.trainable = apply_trainable(self.model, trainable_substrings(cfg.model, tcfg.trainable))
        # Prompt tuning writes adapter.pt (modeling/adapter.py) with each checkpoint: the base's
        # fingerprint is taken once, here (the tensors outside the adapter are frozen), and only
        # the adapter's tensors are gathered at each save.
        self.adapter_names = adapter_tensor_names(self.model) if cfg.model.prompt.enabled else []
        self.adapter_base = base_fingerprint(self.model.state_dict(), self.adapter_names) if self.adapter_names else ""
        self.model.encoder.activation_checkpointing = tcfg.activation_checkpointing
        self.model.to(self.device)
        # Expert parallelism: every rank built all experts from the same seed and keeps its
        # shard (engine/parallelize.py: the ("dp", "ep") mesh, DTensor expert parameters).
        self.mesh = None
        if tcfg.expert_parallel_size > 1:
            self.mesh = build_device_mesh(self.world, tcfg.expert_parallel_size, device_type)
            shard_experts(self.model, self.mesh)
        if tcfg.compile:
            for layer in self.model.encoder.layers:
                layer.compile()
        # Model FLOPs of this step's encoder calls (engine/flops.py), for the logged MFU.
        self.encoder_calls: list[tuple[int, int, int]] = []
        self.model.encoder.register_forward_pre_hook(self._count_encoder_call, with_kwargs=True)
        self.peak_flops = peak_flops(self.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.amp,
                                                                                                         torch.float32))
        self._seed_rank_rngs()

        used_sets = {t.target_set for t in cfg.tasks if t.train_data is not None and t.target_set}
        self.target_sources = {name: build_target_set(name, cfg.target_sets[name], self.tokenizer, self.data_root)
                               for name in sorted(used_sets)}
        self.sliced = {name for name in used_sets if cfg.target_sets[name].distributed}
        self.tasks = self._build_tasks()
        self.sampler = TaskSampler([t.cfg.sampling_weight for t in self.tasks], cfg.seed, self.rank, tcfg.sampling)

        # The release all-gathers retrieval features (without gradient) only when it trains one
        # task (FEATURE_GATHER, OFFICIAL.md 3.3): then every rank runs that task every step.
        single_task = len(self.tasks) == 1 and self.world > 1
        if single_task and task_spec(self.tasks[0].cfg.type).gathers_negatives:
            log.info("task %s: the other %d ranks' features join as negatives (single-task training)",
                     self.tasks[0].cfg.name, self.world - 1)
        self.step_module = TrainStep(self.model, tcfg.one_encoder_call, other_ranks_features if single_task else None)
        self.model.encoder.one_call_per_step = tcfg.one_encoder_call
        # Sharded runs (FSDP; expert parallelism) write distributed checkpoints (engine/dcp.py).
        self.sharded = tcfg.fsdp or self.mesh is not None
        self.fsdp_root: nn.Module | None = None
        device_ids = [self.device.index] if device_type == "cuda" else None
        if tcfg.fsdp and self.world > 1:
            self.fsdp_root = self.ddp = fsdp_lib.wrap_train_step(self.step_module, self.model, device_type, tcfg.amp)
        elif self.mesh is not None:
            self.ddp: nn.Module = wrap_ddp(self.step_module, device_ids)  # skips the expert shards
        elif self.world > 1:
            self.ddp = DDP(self.step_module, device_ids=device_ids, find_unused_parameters=True)
        else:
            self.ddp = self.step_module
        # DTensor shards (experts under EP, the rest under FSDP) next to plain tensors (FSDP keeps
        # the 0-d temperatures whole): the per-parameter update (foreach and fused kernels take
        # one tensor type per call). On CPU torch's default is per-parameter anyway.
        sharded_params = self.mesh is not None or self.fsdp_root is not None
        self.optimizer = build_optimizer(self.model, tcfg.optim, foreach=False if sharded_params else None)
        self.scheduler = build_scheduler(self.optimizer, tcfg.optim, tcfg.max_steps)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.amp)
        self.scaler = torch.amp.GradScaler(device_type, init_scale=LOSS_SCALE_INIT, growth_interval=LOSS_SCALE_WINDOW,
                                           enabled=tcfg.amp == "fp16")
        self.step = 0
        self.stream_starts = [0] * len(self.tasks)  # batches each task stream has already served
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._stop_signal: int | None = None
        self.watchdog = Watchdog(tcfg.collective_timeout_s, tcfg.stop_grace_s, self._request_stop,
                                 watch_collectives=self.world > 1)
        self.logger = TrainLogger(self.output_dir, tcfg, self.rank == 0)

    # ------------------------------------------------------------------ setup
    def _acquire_lock(self) -> None:
        """The main rank locks the output directory; every rank learns whether it got it."""
        problem = None
        if self.rank == 0:
            try:
                self.lock.acquire()
            except OutputDirLockedError as exc:
                problem = str(exc)
        problem = du.all_gather_objects(problem)[0]
        if problem is not None:
            raise OutputDirLockedError(problem)

    def close(self) -> None:
        """Release what the run holds (the log files, the output-directory lock, the watchdog)."""
        self.watchdog.close()
        self.logger.close()
        self.lock.release()

    def _count_encoder_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():  # training calls (targets included); not evaluation
            return
        if kwargs.get("groups") is not None:  # one joint call: attention per group
            for g in kwargs["groups"]:
                self.encoder_calls.append((g.x_BLD.shape[0], g.x_BLD.shape[1], g.ctx.num_segments))
            return
        x_BLD = args[0] if args else kwargs["x_BLD"]
        ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
        self.encoder_calls.append((x_BLD.shape[0], x_BLD.shape[1], getattr(ctx, "num_segments", 1)))

    def _seed_rank_rngs(self) -> None:
        seed = mix_seed(self.cfg.seed, 0x12A4, self.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def _build_tasks(self) -> list[_TaskData]:
        tasks = []
        for task_id, tcfg in enumerate(self.cfg.tasks):
            if tcfg.train_data is None:
                continue
            spec = task_spec(tcfg.type)
            # The size of the class-name set is checked against the labels the data lists.
            num_classes = len(self.target_sources[tcfg.target_set]) if spec.class_labels else None
            dataset = build_dataset(tcfg, "train", self.tokenizer, self.cfg.model, self.data_root, num_classes=num_classes)
            if self.cfg.train.data_fraction < 1.0:
                subset = fraction_indices(len(dataset), self.cfg.train.data_fraction, self.cfg.seed, task_id)
                log.info("task %s: training on %d of %d samples (data_fraction %g)", tcfg.name, len(subset),
                         len(dataset), self.cfg.train.data_fraction)
                if len(subset) < self.world:
                    raise ConfigError(f"train.data_fraction={self.cfg.train.data_fraction:g} leaves task {tcfg.name!r} "
                                      f"{len(subset)} of {len(dataset)} samples, fewer than the {self.world} ranks")
                dataset = DatasetSubset(dataset, subset)
            stream = TaskStream(len(dataset), tcfg.batch_size, self.cfg.seed, task_id, self.rank, self.world)
            collate = make_collate(tcfg, self.tokenizer, training=True, task_id=task_id)
            mixup = build_mixup(tcfg, num_classes) if spec.mixup else None
            tasks.append(_TaskData(tcfg, dataset, collate, stream, mixup))
        if not tasks:
            raise ValueError("no task has train_data: nothing to train")
        return tasks

    def _next_batch(self, task_idx: int, start_batch: int) -> TaskBatch:
        task = self.tasks[task_idx]
        if task.iterator is None:
            loader = torch.utils.data.DataLoader(
                task.dataset, batch_sampler=StreamBatchSampler(task.stream, start_batch), collate_fn=task.collate,
                num_workers=self.cfg.train.num_workers, persistent_workers=self.cfg.train.num_workers > 0,
                # Its own generator: creating a loader must not consume the global RNG, or a
                # resumed run (which creates loaders at another step) would drift.
                generator=torch.Generator().manual_seed(self.cfg.seed),
                worker_init_fn=self.lock.worker_init_fn(_forget_inherited_lock),
            )
            task.iterator = iter(loader)
        return next(task.iterator)

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}

    def _set_rng_state(self, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])

    def state_dict(self) -> dict[str, Any]:
        rng = self._rng_state()
        return {
            # Expert shards are gathered: the file has the replicated layout whatever the EP size.
            "model": full_model_state_dict(self.model) if self.mesh is not None else self.model.state_dict(),
            "optimizer": (full_optimizer_state_dict(self.optimizer) if self.mesh is not None
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite_total": self.nonfinite_total,
            "config": to_dict(self.cfg),
            "rng": du.all_gather_objects(rng),
            "world_size": self.world,
        }

    def save(self) -> None:
        if self.sharded:
            with self._collective("distributed checkpoint save"):
                path = dcp.save_trainer(self)
            log.info("saved %s", path)
            self._save_adapter()
            return
        with self._collective("checkpoint: RNG all_gather_object"):
            state = self.state_dict()  # every rank joins the RNG gather
        if self.rank == 0:
            path = save_checkpoint(state, self.output_dir, self.step, self.cfg.train.keep_last)
            log.info("saved %s", path)
        with self._collective("checkpoint: barrier after the write"):
            du.barrier()
        self._save_adapter()

    def _save_adapter(self) -> None:
        """<output_dir>/adapter.pt: what prompt tuning trained, without the base (every rank joins:
        sharded tensors are gathered)."""
        if not self.adapter_names:
            return
        state = self.model.state_dict()
        with self._collective("adapter: gather the trained tensors"):
            tensors = {k: state[k].full_tensor() if isinstance(state[k], DTensor) else state[k]
                       for k in self.adapter_names}
        if self.rank == 0:
            info = write_adapter(self.output_dir / "adapter.pt", self.cfg.model.prompt, self.adapter_base, tensors)
            log.info("saved %s (%d tensors, %d values)", self.output_dir / "adapter.pt", info["num_tensors"], info["numel"])

    def resume(self) -> bool:
        built = implementation_flags(self.optimizer)
        resumed = self._resume()
        keep_implementation(self.optimizer, built)  # this run's AdamW kernel, whatever wrote the checkpoint
        return resumed

    def _resume(self) -> bool:
        found = load_latest_checkpoint(self.output_dir)
        sharded = dcp.latest_dcp_checkpoint(self.output_dir)
        if sharded is not None and (found is None or sharded[0] >= int(found[0]["step"])):
            dcp.resume_trainer(self, sharded[1])  # a model of other shapes fails here, listing the tensors
            changed = self._config_changes(((dcp.read_marker(sharded[1]) or {}).get("config")), sharded[1])
            self._apply_config_changes(sharded[1], changed)
            return True
        if found is None:
            return False
        state, path = found
        if self.fsdp_root is not None:
            raise dcp.DcpCheckpointError(
                f"{path}: a replicated run's checkpoint cannot resume a train.fsdp=true run; resume it with "
                "train.fsdp=false, or start from its weights with train.init_from")
        changed = self._config_changes(state.get("config"), path)
        if self.mesh is not None:
            load_state_dict_strict(self.model, state["model"], source=str(path), load=load_full_model_state_dict)
            load_full_optimizer_state_dict(self.optimizer, state["optimizer"])
        else:
            load_state_dict_strict(self.model, state["model"], source=str(path))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        rngs = state.get("rng") or []
        if len(rngs) == self.world:
            self._set_rng_state(rngs[self.rank])
        else:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: reseeding", len(rngs), self.world)
        self._apply_config_changes(path, changed)
        return True

    def _config_changes(self, recorded: Any, path: Path) -> list:
        """What differs from the checkpoint's recorded run config; refuses (exit 2, before
        config.yaml is rewritten) settings that cannot change mid-run."""
        if not isinstance(recorded, dict):
            return []
        changed, frozen = split_changes(config_changes(recorded, to_dict(self.cfg)))
        if frozen:
            raise refuse(frozen, str(path))
        return changed

    def _apply_config_changes(self, path: Path, changed: list) -> None:
        if any(c.key.startswith(("train.optim.", "train.max_steps")) for c in changed):
            # The restored optimizer/scheduler hold the old settings; this run's config wins.
            apply_optim_config(self.optimizer, self.scheduler, self.cfg.train.optim, self.cfg.train.max_steps)
        log.info("resumed from %s at step %d", path, self.step)
        if changed:
            log.info("resumed at step %d; changed since the checkpoint: %s", self.step, ", ".join(map(str, changed)))

    # ------------------------------------------------------------------ the loop
    def _request_stop(self, signum: int) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _collective(self, label: str):
        """A stretch that waits on every peer: watched, and a failure names it and the step."""
        if self.world == 1:
            yield
            return
        with self.watchdog.phase(label, self.step):
            try:
                yield
            except RuntimeError as exc:
                if not _is_collective_failure(exc):
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CollectiveError(
                    f"collective '{label}' at step {self.step} failed (train.collective_timeout_s="
                    f"{self.cfg.train.collective_timeout_s:g}; a peer stopped or died?): {first}") from exc

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        if self.world > 1:
            with self._collective("stop-signal all_reduce"):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def train(self) -> dict[str, Any]:
        self.watchdog.start()
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict[str, Any]:
        tcfg = self.cfg.train
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            prepare_checkpoint_dir(self.output_dir)  # orphan temporaries out, unreadable files aside
        with self._collective("barrier before resume"):
            du.barrier()
        self.resume()  # refuses (before config.yaml is touched) when a frozen setting changed
        if self.rank == 0:
            dump_yaml(self.cfg, self.output_dir / "config.yaml")
        # Where each task's sample stream resumes: replay this rank's task draws up to the step.
        self.stream_starts = self.sampler.counts_before(self.step * tcfg.grad_accum)
        self.model.train()
        result: dict[str, Any] = {"preempted": False}
        # What a hung step was waiting in (named in the collective-timeout error).
        engine = "FSDP gradient reduce-scatter" if self.fsdp_root is not None else "DDP gradient all_reduce"
        self._step_collectives = f"train step: {engine}" + (
            " / expert exchange" if self.mesh is not None else "") + " / target-set all_gather"
        while self.step < tcfg.max_steps:
            with self._collective(self._step_collectives):
                logs = self.train_step()
            self.step += 1
            with self._collective("metrics all_gather"):
                self.logger.log_step(self.step, logs, logs["lr"], self.model)
            if self.step % tcfg.checkpoint_every == 0 or self.step == tcfg.max_steps:
                self.save()
            if self._stop_requested():
                if self.step % tcfg.checkpoint_every != 0 and self.step != tcfg.max_steps:
                    self.save()
                log.warning("stopping on signal %s at step %d (checkpoint saved)", self._stop_signal, self.step)
                result["preempted"] = True
                break
        result.update(step=self.step, nonfinite_total=self.nonfinite_total)
        return result

    def train_step(self) -> dict[str, Any]:
        tcfg = self.cfg.train
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.encoder_calls = []
        micro_logs = []
        for micro in range(tcfg.grad_accum):
            global_micro = self.step * tcfg.grad_accum + micro
            task_idx = self.sampler.task_at(global_micro)
            task = self.tasks[task_idx]
            batch = self._next_batch(task_idx, self.stream_starts[task_idx])
            if task.mixup is not None:
                batch = task.mixup(batch, seed=mix_seed(self.cfg.seed, 0x313C, self.rank, global_micro))
            batch = batch.to(self.device)
            # Target sets: the task's own, plus every sliced set (its all-gather is collective).
            # Synonyms are drawn from the step, so all ranks agree on a sliced set's content.
            names = ({task.cfg.target_set} if task.cfg.target_set else set()) | self.sliced
            sets = {n: self.target_sources[n].get(seed=mix_seed(self.cfg.seed, 0x7A67, self.step)).to(self.device)
                    for n in sorted(names)}
            if task.cfg.target_set:
                batch = batch.with_vocabulary_rows(sets[task.cfg.target_set])
            # Accumulate locally; DDP all-reduces (FSDP reduce-scatters) on the last micro-batch only.
            last = micro == tcfg.grad_accum - 1
            if self.fsdp_root is not None:
                fsdp_lib.set_gradient_sync(self.fsdp_root, last)
            sync = contextlib.nullcontext() if last or self.world == 1 or self.fsdp_root is not None else self.ddp.no_sync()
            autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
            with sync:
                with autocast:
                    loss, out = self.ddp(batch, sets, self.sliced)
                self.scaler.scale(loss / tcfg.grad_accum).backward()
            metrics = {k: float(v) for k, v in out.metrics.items()}
            if batch.meta.get("skipped"):
                metrics["skipped_samples"] = float(batch.meta["skipped"])  # unreadable media passed over
            micro_logs.append((task.cfg.name, float(loss.detach()), metrics, out.decisions, batch.inputs.batch_size))

        lr = self.optimizer.param_groups[0]["lr"]
        if self.mesh is not None:
            finish_expert_gradients(self.model, self.mesh)  # zero-filled, reduced over "dp"
        self.scaler.unscale_(self.optimizer)
        clip = tcfg.optim.clip_grad if tcfg.optim.clip_grad is not None else float("inf")
        if self.fsdp_root is not None:
            fsdp_lib.reduce_replicated_grads(fsdp_lib.replicated_parameters(self.model))
            fsdp_lib.drop_globally_unused_grads(fsdp_lib.fsdp_parameters(self.model))
            grad_norm = fsdp_lib.clip_grad_norm_(self.model.parameters(), clip)
        elif self.mesh is not None:
            grad_norm = clip_grad_norm(self.model.parameters(), clip, self.mesh)
        else:
            grad_norm = clip_grad_norm_(self.model.parameters(), clip)
        # Gradients are averaged over ranks already, so every rank takes the same decision here.
        finite = bool(torch.isfinite(grad_norm))
        scale = None
        if tcfg.amp == "fp16":
            scale = self.scaler.get_scale()  # the scale this step was taken with
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan
            self.scaler.update()
            self.scaler.set_growth_interval(loss_scale_growth_interval(self.step, self.scaler.get_scale()))
        elif finite:
            self.optimizer.step()
        self.scheduler.step()
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            if scale is not None and scale > LOSS_SCALE_FLOOR:
                log.info("step %d: fp16 overflow at loss scale %g, update skipped and the scale halved",
                         self.step, scale)
            else:
                self.nonfinite_in_a_row += 1
                at_floor = "" if scale is None else f" with the fp16 loss scale at its floor ({scale:g})"
                log.warning("step %d: non-finite loss/gradient (task %s)%s, update skipped (%d in a row)",
                            self.step, micro_logs[-1][0], at_floor, self.nonfinite_in_a_row)
                if self.nonfinite_in_a_row > tcfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite steps in a row{at_floor} (limit train.max_nonfinite="
                        f"{tcfg.max_nonfinite}); last task {micro_logs[-1][0]} at step {self.step}; "
                        f"no checkpoint written since")
        model_flops = sum(encoder_flops(self.cfg.model, b, length, segments) for b, length, segments in self.encoder_calls)
        return {"micro": micro_logs, "grad_norm": float(grad_norm), "seconds": time.perf_counter() - t0,
                "skipped": not finite, "lr": lr, "model_flops": model_flops, "peak_flops": self.peak_flops}
