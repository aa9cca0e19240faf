"""Training: adapter-only optimizers, the compiled step, data, checkpoints and the loop."""

from jqlora.training.optim import make_optimizer, make_schedule, make_tx
from jqlora.training.step import (IGNORE_INDEX, PMAP_AXIS, chunked_token_loss_sums,
                                  eval_loss_sums, pmap_train_step, token_loss_sums, train_step)

__all__ = ["IGNORE_INDEX", "PMAP_AXIS", "chunked_token_loss_sums", "eval_loss_sums", "make_optimizer", "make_schedule",
           "make_tx", "pmap_train_step", "token_loss_sums", "train_step"]
