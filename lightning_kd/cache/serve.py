"""Serving a teacher-output cache inside :class:`~lightning_kd.core.Distillation`.

With ``teacher_cache=PATH`` the core takes the teacher's logits on the default view (``batch["image"]``) from the
cache, looked up by the batch's ``(index, crop_top, crop_left, flip)``, and runs the live teacher only on the other
views a distiller reads (MLKD's ``"logits@strong"``: the strong view's continuous RandAugment cannot be cached).

Only what the cache holds can be served, so construction refuses (naming the distiller and the tap) a distiller
that reads anything else of the teacher on the default view (features: FitNet, AT, CRD, ...), a distiller that puts
the teacher's BatchNorm in train mode (OFD's ``teacher_bn="train"``), ``teacher_precision`` other than ``"same"``,
and a cache of other teacher weights or another number of classes; :meth:`CacheServer.check_data` (the
:class:`~lightning_kd.DistillationModule` calls it in ``setup``) refuses a cache of other data or another
augmentation, and data whose batches carry no view parameters. Served: KD (+LS), DKD, DIST, NKD, CTKD (KD with
``CurriculumTemperature``) and MLKD's weak view.

``cache_verify_fraction`` re-runs the live teacher on that fraction of the looked-up samples and keeps the largest
``|cached - live|`` (logged as ``train/cache_max_abs_error``): about 1e-6 for an fp32 cache (kernels chosen for
another batch size move the last bits), up to half an fp16 step (``2^-11 |z|``) for an fp16 one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_kd.batch import IMAGE, Batch, split_view
from lightning_kd.cache.store import TeacherCache
from lightning_kd.cache.views import VIEW_KEYS, CacheUnsupportedError, TeacherCacheError, view_space
from lightning_kd.taps import LOGITS

log = logging.getLogger(__name__)


def reads_teacher(distiller: Any) -> bool:
    """Whether a distiller's loss is ever computed with teacher features (main stage or its own stage)."""
    return bool(distiller.needs_teacher and ((distiller.active_in_main and distiller.weight) or distiller.stage_epochs))


def uncovered_taps(distiller: Any) -> list[str]:
    """The distiller's teacher taps on the default view that a cache does not hold (anything but ``logits``)."""
    out = []
    for tap in distiller.teacher_layers:
        base, view = split_view(tap)
        if view in (None, IMAGE) and base != LOGITS:
            out.append(tap)
    return out


def serve_teacher_cache(core: Any, path: str | os.PathLike, verify_fraction: float = 0.0) -> CacheServer:
    """Check that ``core`` can be served by the cache at ``path`` and open it (see the module docstring)."""
    where = f"teacher_cache={os.fspath(path)!r}"
    if core.teacher is None:
        raise TeacherCacheError(f"{where} needs the teacher too (its weights identify the cache): set teacher and "
                                "teacher_checkpoint")
    if core.teacher_precision != "same":
        raise TeacherCacheError(f"{where} holds the fp32 teacher's outputs; teacher_precision="
                                f"{core.teacher_precision!r} asks for others: leave teacher_precision='same'")
    if not 0.0 <= float(verify_fraction) <= 1.0:
        raise ValueError(f"cache_verify_fraction must be in [0, 1], got {verify_fraction}")
    for distiller in core.distillers:
        if getattr(distiller, "teacher_bn_mode", "eval") == "train":
            raise TeacherCacheError(
                f"{where}: distiller {distiller.name!r} ({type(distiller).__name__}) puts the teacher's BatchNorm in "
                "train mode (teacher_bn='train'), so the teacher's outputs change with every batch and cannot be "
                "cached: use teacher_bn='eval' or leave teacher_cache unset"
            )
        if reads_teacher(distiller) and (taps := uncovered_taps(distiller)):
            raise TeacherCacheError(
                f"{where}: distiller {distiller.name!r} ({type(distiller).__name__}) reads the teacher tap "
                f"{taps[0]!r} on the default view, but a cache holds only the teacher's 'logits' there. Served "
                "methods: KD (+LS), DKD, DIST, NKD, CTKD, MLKD; train this one with the live teacher (leave "
                "teacher_cache unset)"
            )
    if not any(reads_teacher(d) for d in core.distillers):
        log.warning("%s is set but no distiller reads the teacher: the cache is not used.", where)
    cache = TeacherCache(path)
    cache.check({"teacher_fingerprint": core.teacher_fingerprint(), "num_classes": core.num_classes,
                 "teacher_mode": "eval", "taps": [LOGITS]},
                ("teacher_fingerprint", "num_classes", "teacher_mode", "taps"))
    live = [v for v in core.views if v != IMAGE]
    runs = f"runs on the views {live} only" if live else "makes no forward in training"
    log.info("Teacher-output cache %s (%s) serves the teacher's logits on the default view: the teacher %s.",
             os.fspath(path), cache.manifest["dtype"], runs)
    return CacheServer(cache, float(verify_fraction))


class CacheServer:
    """The cache as the core uses it: :meth:`features` in place of the teacher's forward on the default view."""

    def __init__(self, cache: TeacherCache, verify_fraction: float = 0.0) -> None:
        self.cache = cache
        self.verify_fraction = verify_fraction
        self.data_checked = False
        self.max_abs_error: Tensor | None = None
        self.verified = 0
        self._autocast_noted = False
        self._rng = np.random.default_rng(0)  # its own stream: the fit's random numbers stay untouched

    @property
    def path(self) -> str:
        return os.fspath(self.cache.path)

    def check_data(self, data: Any) -> None:
        """Refuse unless ``data`` (a data module or its training set) is the data and augmentation the cache was
        built for: dataset fingerprint, augmentation spec and view space, each named on a mismatch."""
        if data is None:
            raise TeacherCacheError(f"teacher_cache={self.path!r} needs the data module (Trainer.fit(model, "
                                    "datamodule=...)) to check that the cache was built for these data")
        space = view_space(data)
        expected = {"dataset_fingerprint": space.fingerprint(), "augmentation": space.spec(),
                    "shape": [space.num_images, *space.view_shape, self.cache.manifest["num_classes"]]}
        self.cache.check(expected, ("dataset_fingerprint", "augmentation", "shape"))
        self.data_checked = True

    def features(self, core: Any, batch: Batch, views: list[str]) -> dict[str, Tensor]:
        """The teacher features of a batch: cached ``logits`` on the default view, the live teacher's on the
        others (``<tap>@<view>``)."""
        if not self.data_checked:
            raise TeacherCacheError(f"teacher_cache={self.path!r}: the data were not checked against the cache; call "
                                    "core.teacher_cache.check_data(datamodule) before training (the "
                                    "DistillationModule does it in setup)")
        missing = [k for k in VIEW_KEYS if k not in batch]
        if missing:
            raise CacheUnsupportedError(f"teacher_cache={self.path!r} looks views up by {list(VIEW_KEYS)}, but the "
                                        f"batch has no {missing} (keys {sorted(batch)})")
        images = batch[IMAGE]
        if not self._autocast_noted and torch.is_autocast_enabled(images.device.type):
            self._autocast_noted = True
            log.warning("teacher_cache serves the fp32 teacher's logits; under this autocast the live teacher would "
                        "have run in reduced precision, so the fit is not bit-equal to a live one (it is closer to the "
                        "fp32 teacher).")
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        logits = self.cache.lookup(*(batch[k] for k in VIEW_KEYS)).to(images.device, dtype, non_blocking=True)
        features = {LOGITS: logits}
        live = [v for v in views if v != IMAGE]
        if live:
            features.update(core.teacher_features(batch, live))  # the core's own forward
        if self.verify_fraction:
            self._verify(core, images, logits)
        return features

    def _verify(self, core: Any, images: Tensor, logits: Tensor) -> None:
        chosen = np.flatnonzero(self._rng.random(len(logits)) < self.verify_fraction)
        if not len(chosen):
            return
        rows = torch.as_tensor(chosen, device=images.device)
        live = core.teacher_features({IMAGE: images.index_select(0, rows)}, [IMAGE])[LOGITS]
        error = (live.double() - logits.index_select(0, rows).double()).abs().max()
        self.max_abs_error = error if self.max_abs_error is None else torch.maximum(self.max_abs_error, error)
        self.verified += len(chosen)

    def pop_max_abs_error(self) -> Tensor | None:
        """The largest ``|cached - live|`` since the last call (``None`` when nothing was verified)."""
        value, self.max_abs_error = self.max_abs_error, None
        return value
