"""Checkpoint hooks of :class:`~lightning_kd.module.DistillationModule`.

What a checkpoint holds besides Lightning's own entries, under ``checkpoint["lightning_kd"]``: the stage, whether
the teacher's weights were saved (by default they are left out and rebuilt from ``teacher``/``teacher_checkpoint``),
a fingerprint of the teacher's weights (a resume or evaluation with other teacher weights is an error unless
``allow_teacher_change``), the skipped-batch count, the divergence guard's and the epoch means' state, and every
random generator's state (a resumed fit draws what an uninterrupted one would).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_kd import rng

TEACHER_PREFIX = "teacher."


class TeacherMismatchError(ValueError):
    """A checkpoint was made with other teacher weights than the ones this module was built with."""


class CheckpointHooks(L.LightningModule):
    """The checkpoint half of the module (it reads the attributes the module sets in ``__init__``)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_check.check()  # never write weights that a non-finite loss has already updated
        if not self.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
                del state[key]
        checkpoint["lightning_kd"] = {
            "stage": self.core.stage.name,
            "teacher_saved": self.save_teacher,
            "teacher_fingerprint": self.teacher_fingerprint,
            "skipped_batches": self.skipped_batches,
            "divergence": self.divergence.state_dict(),
            "epoch_means": self.epoch_means.state_dict(),
            "rng": rng.capture(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = checkpoint.get("lightning_kd", {})
        state = checkpoint["state_dict"]
        if self.teacher is not None and not any(k.startswith(TEACHER_PREFIX) for k in state):
            self._check_teacher(own.get("teacher_fingerprint"))
            # the teacher was left out of the checkpoint: keep the one rebuilt from its source
            state.update({TEACHER_PREFIX + k: v for k, v in self.teacher.state_dict().items()})
        epoch = int(checkpoint.get("epoch", 0))
        self.core.set_epoch(epoch)
        self.skipped_batches = int(own.get("skipped_batches", 0))
        if "divergence" in own:
            self.divergence.load_state_dict(own["divergence"])
        self.epoch_means.load_state_dict(own.get("epoch_means", {}))
        self.teacher_measured = self.teacher is None
        if "rng" in own:  # a resumed fit draws the same random numbers as an uninterrupted one
            rng.restore(own["rng"])

    def _check_teacher(self, saved: str | None) -> None:
        if saved is None or saved == self.teacher_fingerprint or self.allow_teacher_change:
            return
        raise TeacherMismatchError(
            f"this checkpoint was made with other teacher weights (fingerprint {saved[:12]}...) than the teacher "
            f"this run built (fingerprint {self.teacher_fingerprint[:12]}..., from teacher_checkpoint="
            f"{self.hparams.get('teacher_checkpoint')!r}): point model.teacher_checkpoint at the teacher the fit "
            "used, or pass model.allow_teacher_change=true to continue with this one"
        )
