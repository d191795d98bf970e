"""Distillers: one pluggable object per method. See :class:`~lightning_kd.distillers.base.Distiller`."""

from lightning_kd.distillers.base import Distiller
from lightning_kd.distillers.kd import KD


# -- seed methods (VID, RKD, PKT, AB, FT) --
from lightning_kd.distillers.ab import AB
from lightning_kd.distillers.ft import FT
from lightning_kd.distillers.pkt import PKT
from lightning_kd.distillers.rkd import RKD
from lightning_kd.distillers.vid import VID

# -- CRD benchmark methods (FitNet, AT, SP, CC, FSP, NST) --
from lightning_kd.distillers.at import AT
from lightning_kd.distillers.cc import CC
from lightning_kd.distillers.fitnet import FitNet
from lightning_kd.distillers.fsp import FSP
from lightning_kd.distillers.nst import NST
from lightning_kd.distillers.sp import SP

# -- CRD --
from lightning_kd.distillers.crd import CRD

# -- modern logit methods --
from lightning_kd.distillers.ctkd import CurriculumTemperature
from lightning_kd.distillers.dist import DIST
from lightning_kd.distillers.dkd import DKD
from lightning_kd.distillers.nkd import NKD

# -- ReviewKD, OFD, MLKD --
from lightning_kd.distillers.mlkd import MLKD
from lightning_kd.distillers.ofd import OFD
from lightning_kd.distillers.reviewkd import ReviewKD

# -- the table of every method --
from lightning_kd.distillers.registry import MethodEntry, get_distiller, list_distillers  # noqa: E402

__all__ = [name for name in dir() if not name.startswith("_") and name[0].isupper()]
__all__ += ["get_distiller", "list_distillers"]
