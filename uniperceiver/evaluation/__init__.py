"""Zero-shot evaluation: metrics, per-task evaluators and the runner behind
`python -m uniperceiver.eval`."""
from .caption_metrics import caption_metrics, spice_available
from .evaluators import EvalInputError, TaskResult, evaluator_for
from .metrics import (
    best_correct_rank,
    hits_at_k,
    rank_of_label,
    retrieval_metrics,
    retrieval_ranks,
    topk_accuracy,
)
from .report import EvalReport, write_report
from .runner import evaluate
from .sharding import gather_records, shard_range
from .target_features import TargetFeatures

__all__ = [
    "EvalInputError",
    "EvalReport",
    "TargetFeatures",
    "TaskResult",
    "best_correct_rank",
    "caption_metrics",
    "evaluate",
    "evaluator_for",
    "gather_records",
    "hits_at_k",
    "rank_of_label",
    "retrieval_metrics",
    "retrieval_ranks",
    "shard_range",
    "spice_available",
    "topk_accuracy",
    "write_report",
]
