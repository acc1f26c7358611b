"""Training: the Trainer loop (trainer.py), atomic checkpoints (checkpoint.py), torchrun/DDP (distributed.py)."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .trainer import Trainer, TrainError, evaluate, load_run_config

__all__ = ["Trainer", "TrainError", "evaluate", "load_run_config", "CheckpointError", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint"]
