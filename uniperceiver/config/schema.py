"""The run configuration: model, tasks, target sets, training and evaluation.

A YAML file (with `_base_` inheritance) plus `key=value` overrides become a `RunConfig` through
`uniperceiver.config.load_config(RunConfig, path, overrides)`; unknown keys and wrong types fail
there, naming the key and the file. Paths may use environment variables (`$DATA_PATH/coco`):
they are expanded when the data is opened (`resolve_path`), as the release prefixes DATA_PATH.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..utils.resources import demo_data_dir
from .loader import ConfigError
from .model import TEMPERATURE_NAMES, ModelConfig

DataFormat = Literal[
    "imagenet",  # meta/{train,val}.txt of `relpath label`, images under root/{split}/relpath
    "imagenet22k",  # file list of `wnid idx class_id`, images at root/wnid/wnid_idx.JPEG
    "kinetics",  # annotation.json + category_mapping.txt, videos root/{training|validation}/label/name
    "mlm_corpus",  # plain text, one line per document piece
    "coco_karpathy",  # captions_{train113k,val5k,test5k}.json
    "flickr30k",  # all_data_final_{train,val_set0,test_set0}_2014.jsonline
    "msvd",  # caption_msvd_{split}_cocostyle.json + videos root/<file_name>
    "glue",  # GLUE-style TSV (sentence[, sentence2], label)
    "jsonl",  # our manifest: one JSON object per line (image|video|text, label|caption(s))
    "demo",  # the embedded offline demo data
]

def resolve_path(path: str, data_root: str = "") -> str:
    """Expand `$VARS` and `~`; relative paths are taken under `data_root` (the release's DATA_PATH).
    `demo:NAME` is the file NAME of the packaged demo data. A variable that is not set is a
    ConfigError naming it."""
    if path.startswith("demo:"):
        return str(demo_data_dir() / path[len("demo:"):])
    expanded = os.path.expanduser(os.path.expandvars(path))
    if "$" in expanded:
        unset = sorted(set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)))
        names = ", ".join(f"${name}" for name in unset) or "an environment variable"
        hint = " (the datasets folder, the release's open_source_dataset/)" if "DATA_PATH" in unset else ""
        raise ConfigError(f"path {path!r} uses {names}, which is not set: export it{hint}")
    if data_root and not os.path.isabs(expanded):
        return os.path.join(os.path.expanduser(os.path.expandvars(data_root)), expanded)
    return expanded


@dataclass
class DataSourceConfig:
    """Where one split of a task's data lives and how it is laid out."""

    format: DataFormat
    root: str = ""  # images/videos folder (the release's FEATS_FOLDER)
    annotations: str = ""  # annotation file or folder (ANNO_FOLDER)
    split: str = "train"
    # "raise": a missing/corrupt image or malformed annotation line stops with its file and line;
    # "skip": such samples are left out and counted (reported in the logs).
    on_error: Literal["raise", "skip"] = "raise"
    limit: int | None = None  # use only the first N samples (debugging)
    options: dict[str, Any] = field(default_factory=dict)  # format-specific settings

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class TargetSetConfig:
    """A shared candidate set encoded by the model: class names, the vocabulary, verbalisers."""

    kind: Literal["class_names", "vocabulary", "verbalizer"]
    # class_names / verbalizer: a text file with one class per line ('a|b' = synonyms, one drawn
    # per training step), or an inline list. vocabulary: all 49,411 ids, or only the token ids
    # listed in `file` (whitespace-separated integers), e.g. the words of a small corpus.
    file: str | None = None
    names: list[str] | None = None
    # In training, slice the set across ranks and join with a differentiable all-gather.
    distributed: bool = False

    def __post_init__(self) -> None:
        if self.kind != "vocabulary" and (self.file is None) == (self.names is None):
            raise ValueError(f"a {self.kind} target set needs exactly one of 'file' or 'names'")
        if self.kind == "vocabulary" and self.names is not None:
            raise ValueError("a vocabulary target set takes no 'names' (use 'file' with token ids)")


@dataclass
class TaskConfig:
    name: str
    # A registered task type (`uniperceiver.tasks`): image_classification, video_classification,
    # text_classification, image_retrieval, video_retrieval, image_caption, video_caption, text_mlm.
    type: str
    train_data: DataSourceConfig | None = None
    eval_data: DataSourceConfig | None = None
    target_set: str | None = None  # a key of RunConfig.target_sets
    batch_size: int = 8
    eval_batch_size: int = 16
    sampling_weight: float = 1.0
    loss_weight: float = 1.0
    label_smoothing: float = 0.0
    temperature: str | None = None  # default: the type's (its TaskSpec.temperature)
    max_text_len: int = 50
    # Visual input: None = model.image_size. Videos: frames per clip and the stride at 30 fps.
    image_size: int | None = None
    frames: int = 1
    frame_stride: int = 32
    # Evaluation views for video classification (the release's K400 protocol: 4 clips x 3 crops).
    eval_clips: int = 1
    eval_crops: int = 1
    # Training augmentation: "default" picks by type (RandAugment for ImageNet-style
    # classification, CLIP-style crops for captions/retrieval, jittered crops for video).
    augment: Literal["default", "none"] = "default"
    mixup: float = 0.0  # mixup alpha (0 = off); with cutmix, soft-target CE as S1 IN-22k
    cutmix: float = 0.0
    mlm_probability: float = 0.15
    # Caption decoding
    beam_size: int = 2
    max_gen_len: int = 21
    len_penalty: float = 0.0

    def __post_init__(self) -> None:
        from ..utils.task_registry import task_spec

        spec = task_spec(self.type)
        if self.temperature is None:
            self.temperature = spec.temperature
        if self.temperature not in TEMPERATURE_NAMES:
            raise ValueError(f"temperature {self.temperature!r} is not one of {list(TEMPERATURE_NAMES)}")
        for name in ("batch_size", "eval_batch_size", "max_text_len", "frames", "beam_size", "max_gen_len",
                     "eval_clips", "eval_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sampling_weight < 0:
            raise ValueError(f"sampling_weight must be >= 0, got {self.sampling_weight}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if spec.needs_target_set and self.target_set is None:
            raise ValueError(f"task type {self.type} needs a target_set")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine, per iteration (OFFICIAL.md 6)."""

    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6
    warmup_steps: int = 10000
    clip_grad: float | None = 0.1  # global L2 norm; None = off

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 1000
    checkpoint_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    # Task sampling: "weighted" draws a task per rank and step by sampling_weight (the release);
    # "round_robin" cycles through the tasks, offset by rank.
    sampling: Literal["weighted", "round_robin"] = "weighted"
    amp: Literal["none", "bf16", "fp16"] = "none"
    grad_accum: int = 1
    activation_checkpointing: bool = False
    # torch.compile every encoder layer (on CUDA: inductor kernels; MoE layers take their
    # static, sync-free path under compile). Compiling takes minutes on a CPU: a GPU setting.
    compile: bool = False
    # Consecutive skipped non-finite steps before aborting. With fp16 only steps skipped while the
    # loss scale is already at its floor (1.0) count: the scaler's own backoffs are not failures.
    max_nonfinite: int = 10
    # A collective that does not complete in this time (a peer stopped or died) ends the run with
    # an error naming it and the step; passed to the process group, backed by a watchdog thread.
    collective_timeout_s: float = 600.0
    # After SIGTERM/SIGUSR1 the run saves at the end of its step and exits; if it is still running
    # this long after the signal (blocked in a collective), it exits without saving. A second
    # signal exits at once.
    stop_grace_s: float = 60.0
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    init_from: str | None = None  # model weights to start from (a converted/saved model file)
    # The freezing rule: a parameter trains iff its name contains one of these substrings.
    # None: everything trains, except with model.prompt.enabled, where the release's list
    # (RELEASE_PROMPT_TRAINABLE) applies.
    trainable: list[str] | None = None
    # Encode everything of a micro-step (inputs, own and distributed target sets) in ONE encoder
    # call, so every MoE sublayer runs once per micro-step on every rank (needed by expert
    # parallelism); false: one call per sequence batch, as before (for comparisons).
    one_encoder_call: bool = True
    # Experts of every MoE sublayer split over this many ranks (1 = replicated under DDP).
    expert_parallel_size: int = 1
    # Train on this fraction of every task's training set (the release's DATA_PERCENTAGE, 0.01 in
    # its prompt-tuning recipes): a subset seeded by (seed, task), the same on every rank and
    # after a resume.
    data_fraction: float = 1.0
    tensorboard: bool = True
    # FSDP2 (fully_shard) instead of DDP: parameters, gradients and optimizer states sharded over
    # the ranks (experts placed by expert parallelism excepted); checkpoints are then
    # distributed (DCP) directories. On GPU with amp=bf16, parameters compute in bf16 and
    # gradients reduce in fp32.
    fsdp: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "checkpoint_every", "keep_last", "log_every", "grad_accum", "max_nonfinite",
                     "expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fsdp and self.amp == "fp16":
            raise ValueError("fsdp=true supports amp none or bf16, not fp16 (loss scaling of sharded gradients)")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if self.trainable is not None and (not self.trainable or not all(self.trainable)):
            raise ValueError(f"trainable must be a non-empty list of non-empty substrings, got {self.trainable}")
        for name in ("collective_timeout_s", "stop_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    checkpoint: str | None = None
    # An adapter file (prompt tuning: the trained prompts/norms) loaded on top of `checkpoint`,
    # its base; the adapter's prompt switches replace model.prompt.
    adapter: str | None = None
    tasks: list[str] | None = None  # default: every task with eval_data
    output_json: str | None = None  # default: <train.output_dir>/eval.json
    cache_dir: str | None = None  # cache encoded target sets on disk, keyed by checkpoint + set
    target_chunk_size: int = 4096
    # Pinned metrics ("task/metric": value) and the allowed absolute miss; a miss exits non-zero.
    expected: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.01
    # Caption scorers to run (None = BLEU, METEOR, ROUGE_L, CIDEr and SPICE when its jars exist);
    # METEOR and the PTB tokenizer start a JVM. spice: None = when available, True = required.
    caption_metrics: list[Literal["BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]] | None = None
    spice: bool | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    target_sets: dict[str, TargetSetConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    data_root: str = ""  # relative data paths are taken under it (default $DATA_PATH if set)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {dup}")
        for task in self.tasks:
            if task.target_set is not None and task.target_set not in self.target_sets:
                raise ValueError(
                    f"task {task.name!r} uses target_set {task.target_set!r}, not defined in target_sets "
                    f"(defined: {sorted(self.target_sets)})"
                )
        for name in self.model.prompt.fc_prompt_tasks:
            if name not in names:
                raise ValueError(f"model.prompt.fc_prompt_tasks names {name!r}, not a task (tasks: {names})")
            from ..utils.task_registry import task_spec

            if not task_spec(self.task(name).type).fc_prompt:
                raise ValueError(
                    f"model.prompt.fc_prompt_tasks: {name!r} is a {self.task(name).type} task; the FC "
                    "prompt applies to image/video classification only"
                )
        if self.model.moe.enabled and self.model.moe.routing.router == "task":
            if len(self.tasks) > self.model.moe.routing.num_tasks:
                raise ValueError(
                    f"{len(self.tasks)} tasks but model.moe.routing.num_tasks={self.model.moe.routing.num_tasks}"
                )
        ep = self.train.expert_parallel_size
        if ep > 1:
            moe = self.model.moe
            if not moe.enabled:
                raise ValueError(f"train.expert_parallel_size={ep} needs an MoE model (model.moe.enabled=true)")
            if moe.routing.num_experts % ep:
                raise ValueError(
                    f"train.expert_parallel_size={ep} must divide model.moe.routing.num_experts={moe.routing.num_experts}"
                )
            if self.model.prompt.enabled and self.model.prompt.deep:
                raise ValueError(
                    f"train.expert_parallel_size={ep} does not combine with deep prompts (model.prompt.deep): "
                    "their split qkv path encodes each sequence batch separately"
                )
            if not self.train.one_encoder_call:
                raise ValueError(
                    f"train.expert_parallel_size={ep} needs train.one_encoder_call=true (ranks must run every "
                    "MoE sublayer the same number of times per step)"
                )

    def resolved_data_root(self) -> str:
        """Where relative data paths live: `data_root`, else $DATA_PATH (training and evaluation alike)."""
        return self.data_root or os.environ.get("DATA_PATH", "")

    def check_data_paths(self, split: Literal["train", "eval"], task_names: list[str] | None = None) -> None:
        """Fail before any work (loading a checkpoint, building a model) when a data path of the
        `split` side of the tasks (default: every task with such data) or of their target sets
        uses an unset variable such as $DATA_PATH; the error names the config key."""
        root = self.resolved_data_root()
        attr = "train_data" if split == "train" else "eval_data"
        paths: list[tuple[str, str, str]] = [("data_root", "", self.data_root)]  # (key, whose, value)
        for i, task in enumerate(self.tasks):
            source = getattr(task, attr)
            if source is None or (task_names is not None and task.name not in task_names):
                continue
            whose = f" (task {task.name!r})"
            paths += [(f"tasks[{i}].{attr}.{name}", whose, getattr(source, name)) for name in ("root", "annotations")]
            ts = self.target_sets.get(task.target_set or "")
            if ts is not None and ts.file:
                paths.append((f"target_sets.{task.target_set}.file", whose, ts.file))
        if split == "train" and self.train.init_from:
            paths.append(("train.init_from", "", self.train.init_from))
        for key, whose, value in paths:
            try:
                resolve_path(value, "" if key == "data_root" else root)
            except ConfigError as e:
                raise ConfigError(f"config key '{key}'{whose}: {e}") from None

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.tasks]}")
