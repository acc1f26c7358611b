"""Training: the Trainer loop (trainer.py), verifiable atomic checkpoints (checkpoint.py), torchrun/DDP
(distributed.py)."""
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, newest_verified, resume_checkpoint,
                         save_checkpoint, verify_checkpoint)
from .trainer import Trainer, TrainError, evaluate, load_run_config

__all__ = ["Trainer", "TrainError", "evaluate", "load_run_config", "CheckpointError", "latest_checkpoint",
           "load_checkpoint", "save_checkpoint", "newest_verified", "resume_checkpoint", "verify_checkpoint"]
