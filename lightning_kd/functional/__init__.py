"""Pure distillation losses: tensors in, a scalar tensor out, no parameters and no state.

One file per method. Every function computes in fp32 (inputs are cast with ``.float()``), so it is safe
under bf16/fp16 autocast, and returns a finite value for any finite input. Teacher tensors are expected to
arrive detached; the functions are differentiable in their student arguments. The specification of each
loss is in the project's METHODS.md; each docstring repeats the formula.
"""

from lightning_kd.functional._utils import as_float, flatten_samples, pool_to_smaller, safe_normalize
from lightning_kd.functional.kd import kd_loss

# -- seed methods (VID, RKD, PKT, AB, FT) --
from lightning_kd.functional.ab import ab_loss
from lightning_kd.functional.ft import ft_loss
from lightning_kd.functional.pkt import pkt_loss
from lightning_kd.functional.rkd import rkd_loss
from lightning_kd.functional.vid import vid_loss

# -- CRD benchmark methods (FitNet, AT, SP, CC, FSP, NST) --
from lightning_kd.functional.at import at_loss, attention_map
from lightning_kd.functional.cc import cc_loss
from lightning_kd.functional.fsp import fsp_loss, fsp_matrix
from lightning_kd.functional.hint import hint_loss
from lightning_kd.functional.nst import mean_polynomial_kernel, nst_loss
from lightning_kd.functional.sp import similarity_matrix, sp_loss

# -- CRD --
from lightning_kd.functional.crd import contrast_loss, contrast_scores, crd_batch_loss, momentum_update

# -- modern logit methods --
from lightning_kd.functional.ctkd import ctkd_lambda, gradient_reversal
from lightning_kd.functional.dist import dist_loss, pearson_rows
from lightning_kd.functional.dkd import class_indices, dkd_loss, non_target_logits
from lightning_kd.functional.kd import check_logits, standardize_logits
from lightning_kd.functional.nkd import nkd_loss

# -- ReviewKD, OFD, MLKD --
from lightning_kd.functional.mlkd import batch_correlation_loss, class_correlation_loss, confidence_masks, mlkd_loss
from lightning_kd.functional.ofd import ofd_loss, ofd_margin
from lightning_kd.functional.reviewkd import hcl_level_weights, hcl_loss

__all__ = [name for name, value in dict(globals()).items() if not name.startswith("_") and callable(value)]
