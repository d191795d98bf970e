"""Learnable adapters shared by distillers: they map a student feature to the teacher's shape (or to an
embedding). Each is an ``nn.Module`` owned by the distiller that uses it, so DDP, checkpointing and the
optimizer see it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_kd.functional import safe_normalize


class LinearEmbed(nn.Module):
    """Flatten, then a linear map to ``dim``, then (optionally) L2-normalise: CC's and CRD's embeddings."""

    def __init__(self, in_features: int, dim: int = 128, normalize: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x.reshape(x.shape[0], -1))
        return safe_normalize(out.float(), dim=1) if self.normalize else out


# -- seed methods (VID regressor, AB connector, FT paraphraser and translator) --

# -- CRD benchmark methods (FitNet connector) --

