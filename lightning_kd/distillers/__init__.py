"""Distillers: one pluggable object per method. See :class:`~lightning_kd.distillers.base.Distiller`."""

from lightning_kd.distillers.base import Distiller
from lightning_kd.distillers.kd import KD


# -- seed methods (VID, RKD, PKT, AB, FT) --

# -- CRD benchmark methods (FitNet, AT, SP, CC, FSP, NST) --

# -- CRD --

__all__ = [name for name in dir() if not name.startswith("_") and name[0].isupper()]
