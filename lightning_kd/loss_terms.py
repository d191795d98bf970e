"""The loss terms of one batch, as :meth:`lightning_kd.core.Distillation.compute_losses` returns them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class LossTerms:
    """The loss terms of one batch: ``losses[name]`` (scalar tensors) and their ``weights``."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: Tensor, weight: float) -> None:
        self.losses[name] = value
        self.weights[name] = weight

    @property
    def total(self) -> Tensor:
        """``sum_i weights[i] * losses[i]``."""
        return sum(self.weights[name] * value for name, value in self.losses.items())  # type: ignore[return-value]
