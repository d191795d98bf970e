"""CRD: Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation"."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_kd.connectors import LinearEmbed
from lightning_kd.distillers.base import Batch, Distiller
from lightning_kd.functional.crd import contrast_loss, contrast_scores, crd_batch_loss, momentum_update

log = logging.getLogger(__name__)


class CRD(Distiller):
    """Contrastive representation distillation with memory banks (the reference) or in-batch negatives.

    On the penultimate embedding of each side, a trainable :class:`~lightning_kd.connectors.LinearEmbed`
    (to ``feat_dim`` = 128, L2-normalised) gives ``v_s`` and ``v_t``. With ``negatives="memory"``:

    - two memory banks ``M_s``, ``M_t`` of ``N x 128`` (one row per training sample; buffers, so they are
      saved in checkpoints), initialised uniformly in ``[-1/sqrt(128/3), 1/sqrt(128/3)]``;
    - scores ``exp(<v, M[c]> / T)``, ``T = 0.07``, at the sample's ``batch["contrast_index"]`` (B, K + 1)
      (column 0 the sample itself, then K negatives of other classes, drawn by the data module:
      ``contrast_negatives``), divided by a constant ``Z = mean score x N`` estimated once on the first
      batch for each direction (the ``normalizer`` buffer; negative = not yet estimated);
    - the NCE loss :func:`~lightning_kd.functional.contrast_loss` in both directions, student anchor
      against the teacher bank plus teacher anchor against the student bank;
    - after the loss, the rows of the batch's samples (``batch["index"]``) are updated:
      ``M[i] = normalize(0.5 M[i] + 0.5 v_i)``. Under data parallelism every rank gathers the indices and
      embeddings of all ranks and applies all of them, so the banks stay identical everywhere (this uses
      ``torch.distributed``, gloo or NCCL, and no CUDA-only call). DDP's default ``broadcast_buffers=True``
      also copies rank 0's banks to every rank before each step (2 x 25 MB for CIFAR-100, 2 x 650 MB for
      ImageNet); the banks are identical already, so ``DDPStrategy(broadcast_buffers=False)`` can save
      that traffic (BatchNorm statistics then stay per rank, as usual with that setting).

    Everything is fp32 whatever the autocast (the scores overflow fp16). The bank size N must be known
    before the optimizer and the checkpoint exist: pass ``num_data``, or let the
    :class:`~lightning_kd.DistillationModule` call :meth:`setup_data` in its ``setup``, which reads
    ``datamodule.num_samples`` (and refuses a data module without contrastive sampling).

    With ``negatives="batch"`` there is no bank, no ``Z`` and no index from the data: the other samples of
    the batch serve as negatives (same-class samples are left out) in a symmetric InfoNCE,
    :func:`~lightning_kd.functional.crd_batch_loss`. It is cheaper and needs nothing from the data module,
    but it sees B - 1 negatives instead of K = 16384 and is not the reference method.

    Reference weight (CIFAR-100): 0.8 with ``task_loss_weight=1`` (CRD+KD: 0.8 and KD weight 1).

    Args:
        weight: factor of this loss in the objective (reference 0.8).
        feat_dim: embedding size (reference 128).
        temperature: ``T`` of the scores (reference 0.07).
        momentum: weight of the old memory row in the update (reference 0.5).
        num_data: training-set size N; ``None`` learns it from the data module at setup.
        negatives: ``"memory"`` (the reference) or ``"batch"``.
        student_layers, teacher_layers, name: see :class:`Distiller` (layers default to ``"embedding"``).
    """

    default_student_layers = ("embedding",)

    def __init__(
        self,
        weight: float = 0.8,
        feat_dim: int = 128,
        temperature: float = 0.07,
        momentum: float = 0.5,
        num_data: int | None = None,
        negatives: Literal["memory", "batch"] = "memory",
        **kwargs: Any,
    ) -> None:
        super().__init__(weight=weight, **kwargs)
        if negatives not in ("memory", "batch"):
            raise ValueError(f"CRD negatives must be 'memory' or 'batch', got {negatives!r}")
        if feat_dim < 1:
            raise ValueError(f"CRD feat_dim must be >= 1, got {feat_dim}")
        if temperature <= 0:
            raise ValueError(f"CRD temperature must be positive, got {temperature}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"CRD momentum must be in [0, 1], got {momentum}")
        if num_data is not None and num_data < 1:
            raise ValueError(f"CRD num_data must be >= 1 (or None to read it from the data module), got {num_data}")
        if len(self.student_layers) != 1 or len(self.teacher_layers) != 1:
            raise ValueError(
                f"CRD reads one layer per side, got student_layers={self.student_layers} and "
                f"teacher_layers={self.teacher_layers}"
            )
        self.feat_dim = int(feat_dim)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.negatives = negatives
        self._requested_num_data = num_data
        self.embed_student: LinearEmbed | None = None
        self.embed_teacher: LinearEmbed | None = None
        # empty until N is known (build() with num_data, or setup_data()); resized on checkpoint load
        self.register_buffer("memory_student", torch.empty(0, self.feat_dim))
        self.register_buffer("memory_teacher", torch.empty(0, self.feat_dim))
        #: Z of (student anchor vs teacher bank, teacher anchor vs student bank); negative = not estimated
        self.register_buffer("normalizer", torch.full((2,), -1.0))
        self._normalizer_known = False
        self._undo: list | None = None  # bank rows overwritten in a step that may be skipped

    # --- set-up -------------------------------------------------------------------------------------------
    def build(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        student, teacher = student_features[0], teacher_features[0]
        self.embed_student = LinearEmbed(student[0].numel(), self.feat_dim, normalize=True)
        self.embed_teacher = LinearEmbed(teacher[0].numel(), self.feat_dim, normalize=True)
        if self.negatives == "memory" and self._requested_num_data is not None:
            self.reset_memory(self._requested_num_data)

    @property
    def num_data(self) -> int:
        """N, the number of rows of the memory banks (0 while unknown)."""
        return int(self.memory_student.shape[0])

    def reset_memory(self, num_data: int) -> None:
        """(Re)allocate both banks with ``num_data`` rows, uniform in ``[-1/sqrt(D/3), 1/sqrt(D/3)]``, and
        forget ``Z``. Each coordinate then has variance ``1/D``: rows have unit norm on average."""
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        device = self.memory_student.device
        self.memory_student = torch.empty(num_data, self.feat_dim, device=device).uniform_(-bound, bound)
        self.memory_teacher = torch.empty(num_data, self.feat_dim, device=device).uniform_(-bound, bound)
        self.normalizer = torch.full((2,), -1.0, device=device)
        self._normalizer_known = False

    def setup_data(self, datamodule: Any) -> None:
        """Check that the data provides CRD's indices and size the banks to the training set.

        Called by :meth:`DistillationModule.setup` (before checkpoint loading and DDP wrapping).
        """
        if self.negatives == "batch":
            return
        if datamodule is None:
            if not self.num_data:
                raise ValueError(
                    "CRD with memory banks needs the training-set size: fit with a data module that has "
                    "num_samples and contrast_negatives (e.g. DigitsDataModule(contrast_negatives=256)), or pass "
                    "CRD(num_data=N) and batches carrying 'index' and 'contrast_index'"
                )
            return
        k = getattr(datamodule, "contrast_negatives", 0)
        if not k:
            raise ValueError(
                f"CRD needs contrastive indices from the data module (batch['index'] and "
                f"batch['contrast_index']), but {type(datamodule).__name__} has contrast_negatives={k!r}: "
                "set data.contrast_negatives=16384 (the reference K; a few hundred for the digits), or use "
                "CRD(negatives='batch')"
            )
        n = getattr(datamodule, "num_samples", None)
        if not n:
            raise ValueError(f"CRD needs the training-set size, but {type(datamodule).__name__} has no num_samples")
        if n != self.num_data:
            if self.num_data:
                log.warning("CRD: resizing the memory banks from %d to %d rows (the data size)", self.num_data, n)
            self.reset_memory(int(n))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("memory_student", "memory_teacher"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        self._normalizer_known = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- the loss -----------------------------------------------------------------------------------------
    def forward(self, student_features: list[Tensor], teacher_features: list[Tensor], batch: Batch) -> Tensor:
        if self.embed_student is None or self.embed_teacher is None:
            raise RuntimeError("CRD.build() has not run: add the distiller to a DistillationModule")
        v_s = self.embed_student(student_features[0])
        v_t = self.embed_teacher(teacher_features[0])
        if self.negatives == "batch":
            return crd_batch_loss(v_s, v_t, self.temperature, labels=batch.get("label"))

        if "index" not in batch or "contrast_index" not in batch:
            raise KeyError(
                f"CRD needs batch['index'] and batch['contrast_index'], found keys {sorted(batch)}: "
                "set data.contrast_negatives=16384 on the data module"
            )
        n = self.num_data
        if not n:
            raise RuntimeError(
                "CRD's memory banks are not allocated: pass num_data or fit with a data module (setup sizes them)"
            )
        index, contrast_index = batch["index"].long(), batch["contrast_index"].long()
        scores_s = contrast_scores(v_s, self.memory_teacher, contrast_index, self.temperature)
        scores_t = contrast_scores(v_t, self.memory_student, contrast_index, self.temperature)
        if not self._normalizer_known:
            if bool((self.normalizer < 0).any()):
                self._estimate_normalizer(scores_s.detach(), scores_t.detach())
            self._normalizer_known = True
        loss = contrast_loss(scores_s / self.normalizer[0], n) + contrast_loss(scores_t / self.normalizer[1], n)
        if self.training:
            self._update_memory(index, v_s.detach(), v_t.detach())
        return loss

    # --- state --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _estimate_normalizer(self, scores_s: Tensor, scores_t: Tensor) -> None:
        """``Z = mean score x N`` per direction, the mean taken over every rank's first batch."""
        count = torch.tensor(float(scores_s.numel()), dtype=torch.float64, device=scores_s.device)
        stats = torch.stack([scores_s.double().sum(), scores_t.double().sum(), count])
        if _distributed():
            dist.all_reduce(stats)
        z = stats[:2] / stats[2] * self.num_data
        self.normalizer.copy_(z.to(self.normalizer.dtype))
        log.info("CRD: normalising constants Z = %.4g (student anchor), %.4g (teacher anchor)", *z.tolist())

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of both banks at every rank's indices (the last write wins for a repeated index)."""
        if _distributed():
            packed = torch.cat([index.unsqueeze(1).double(), v_s.double(), v_t.double()], dim=1)
            packed = _all_gather_rows(packed)
            index = packed[:, 0].round().long()
            v_s, v_t = packed[:, 1 : 1 + self.feat_dim], packed[:, 1 + self.feat_dim :]
        unique, inverse = torch.unique(index, return_inverse=True)
        position = torch.arange(index.numel(), device=index.device)
        last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, position, reduce="amax")
        for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            old = bank.index_select(0, unique)
            if self._undo is not None:
                self._undo.append((bank, unique, old))
            rows = momentum_update(old, v[last], self.momentum)
            bank.index_copy_(0, unique, rows.to(bank.dtype))

    # --- a skipped batch leaves the banks as they were --------------------------------------------------------
    def snapshot_state(self) -> dict[str, Any]:
        """Start an undo log of the bank rows the next forward overwrites (not a copy of the N x 128 banks)."""
        self._undo = []
        return {"normalizer": self.normalizer.detach().clone(), "known": self._normalizer_known}

    @torch.no_grad()
    def restore_state(self, snapshot: dict[str, Any]) -> None:
        for bank, rows, old in reversed(self._undo or []):
            bank.index_copy_(0, rows, old)
        self.normalizer.copy_(snapshot["normalizer"])
        self._normalizer_known = snapshot["known"]
        self._undo = None

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", negatives={self.negatives!r}, feat_dim={self.feat_dim}, temperature={self.temperature}, "
            f"momentum={self.momentum}, num_data={self.num_data}"
        )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``(n_r, ...)`` tensor in rank order (ranks may hold different n_r)."""
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])
