"""Training engine: trainer, task sampling, optimizer/schedule, checkpoints, logging."""
from .checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from .optim import build_optimizer, build_scheduler, lr_factor
from .sampler import TaskSampler, TaskStream, mix_seed
from .trainer import NonFiniteLossError, Trainer

__all__ = [
    "NonFiniteLossError",
    "TaskSampler",
    "TaskStream",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "list_checkpoints",
    "load_latest_checkpoint",
    "lr_factor",
    "mix_seed",
    "save_checkpoint",
]
