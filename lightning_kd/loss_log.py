"""What the module logs about its loss terms, and when.

- :class:`EpochMeans`: every term summed over the epoch on its device (no host synchronisation per step); the means
  reach every logger at the epoch's end as ``train/<term>_epoch``, so a run of 23 batches an epoch still gets one
  point per epoch for every term whatever ``log_every_n_steps`` is.
- :func:`is_logging_step`: step values are logged on the steps the loggers write (``Trainer(log_every_n_steps)``)
  and on the last step of an epoch and of the fit. Not at every step: each ``self.log`` call costs about 0.3 ms,
  and a progress-bar value is read back to the host at every step it is logged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor


class EpochMeans:
    """Running sums of the loss terms over one epoch, kept on their device."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def pop(self) -> dict[str, Tensor]:
        """The epoch's means (empty when no step was recorded), and a fresh start."""
        means = {name: total / self.steps for name, total in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = dict(state.get("sums", {})), int(state.get("steps", 0))


def is_logging_step(trainer: L.Trainer, global_step: int, batch_idx: int) -> bool:
    """Whether step ``global_step`` (0-based, before its optimizer step) logs its values."""
    if trainer.fast_dev_run or batch_idx + 1 >= trainer.num_training_batches:
        return True
    if 0 < trainer.max_steps <= global_step + 1:
        return True
    return (global_step + 1) % max(1, trainer.log_every_n_steps) == 0
