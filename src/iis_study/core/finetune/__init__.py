"""Fine-tuning with interpretability maximization (METHOD §6), one public surface.

:func:`finetune` trains one (λ, seed) run (:mod:`.loop`); :func:`fine_tune_representation` every arm of
one representation and :func:`collect_histories` / :func:`summarise` the tables (:mod:`.study`). The
pieces: :mod:`.config` (the ``fine_tuning`` block :class:`FineTuningParams`, one run's
:class:`FineTuningTrainParams`, :class:`EpochRecord`, input checks), :mod:`.training` (heads, loss, data order,
schedule, one epoch), :mod:`.scoring` (prototype concepts, the IIS along training) and
:mod:`.checkpoints` (checkpoint files, resume, the fine-tuned backbone, :class:`CheckpointStore`).
"""

from .checkpoints import CheckpointStore, finetuned_spec, list_checkpoints, run_checkpoint_dir
from .blocks import EpochRecord, FineTuningTrainParams, FineTuningParams
from .loop import finetune
from .scoring import evaluate_representation, prototype_images, score_features
from .arms import collect_histories, fine_tune_representation, summarise

__all__ = [
    "CheckpointStore",
    "EpochRecord",
    "FineTuningParams",
    "FineTuningTrainParams",
    "collect_histories",
    "evaluate_representation",
    "fine_tune_representation",
    "finetune",
    "finetuned_spec",
    "list_checkpoints",
    "prototype_images",
    "run_checkpoint_dir",
    "score_features",
    "summarise",
]
