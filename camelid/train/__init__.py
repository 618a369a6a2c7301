"""Training: one loop (loop.py) for pretraining and, later, fine-tuning; see docs/TRAINING.md."""

from camelid.train.config import TrainConfig
from camelid.train.loop import BatchSource, TrainResult, train
from camelid.train.optim import Lion, lr_at

__all__ = ["BatchSource", "Lion", "TrainConfig", "TrainResult", "lr_at", "train"]
