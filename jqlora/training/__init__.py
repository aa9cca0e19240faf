"""The training layer: adapter-only optimizers, the compiled step, data, checkpoints, the loop.

``jqlora.training.config`` holds the run's settings (``TrainConfig``); the loop
reads that one object and never the CLI.
"""

from jqlora.training.batch import IGNORE_INDEX, Batch
from jqlora.training.dpo import DPOLoss, dpo_loss, dpo_step, evaluate_preferences, sequence_logps
from jqlora.training.optim import make_optimizer, make_schedule, make_tx, nonfinite_counts
from jqlora.training.step import (
                                  PMAP_AXIS,
                                  LossFn,
                                  chunked_token_loss_sums,
                                  eval_loss_sums,
                                  functional_step,
                                  pmap_train_step,
                                  sft_loss,
                                  token_loss_sums,
                                  train_step,
)

__all__ = ["IGNORE_INDEX", "PMAP_AXIS", "Batch", "DPOLoss", "LossFn", "chunked_token_loss_sums",
           "dpo_loss", "dpo_step", "eval_loss_sums", "evaluate_preferences", "sequence_logps", "sft_loss",
           "functional_step", "make_optimizer", "make_schedule", "make_tx", "nonfinite_counts",
           "pmap_train_step", "token_loss_sums", "train_step"]
