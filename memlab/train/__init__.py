"""Training: the loop every benchmark run uses, seeding and safetensors checkpoints."""

from memlab.train.seed import seed_everything
from memlab.train.trainer import (
    TrainConfig,
    TrainResult,
    evaluate,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seq_loss,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "save_checkpoint",
    "seed_everything",
    "seq_loss",
    "train",
]
