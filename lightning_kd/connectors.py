"""Learnable adapters shared by distillers: they map a student feature to the teacher's shape (or to an
embedding). Each is an ``nn.Module`` owned by the distiller that uses it, so DDP, checkpointing and the
optimizer see it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_kd.functional import as_float, safe_normalize


class LinearEmbed(nn.Module):
    """Flatten, then a linear map to ``dim``, then (optionally) L2-normalise: CC's and CRD's embeddings."""

    def __init__(self, in_features: int, dim: int = 128, normalize: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x.reshape(x.shape[0], -1))
        return safe_normalize(as_float(out), dim=1) if self.normalize else out


# -- seed methods (VID regressor, AB connector, FT paraphraser and translator) --
class VIDRegressor(nn.Module):
    """VID's predictor of the teacher map: the mean ``mu`` and a per-channel variance.

    ``mu = conv1x1(relu(conv1x1(relu(conv1x1(f_s)))))`` (``C_s -> C_mid -> C_mid -> C_t``, no biases), and
    ``var = softplus(alpha) + eps`` with ``alpha`` set so that ``var = init_variance`` at the start
    (``torch.nn.functional.softplus`` is stable for large ``alpha``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        init_variance: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if init_variance <= eps:
            raise ValueError(f"VID init_variance must exceed eps={eps}, got {init_variance}")
        mid = mid_channels or out_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1, bias=False),
        )
        target = torch.tensor(init_variance - eps, dtype=torch.float64)
        inverse_softplus = float(target + torch.log(-torch.expm1(-target)))
        self.alpha = nn.Parameter(torch.full((out_channels,), inverse_softplus))
        self.eps = eps

    def variance(self) -> Tensor:
        """``(C_t,)`` per-channel variance, fp32."""
        return torch.nn.functional.softplus(as_float(self.alpha)) + self.eps

    def forward(self, x: Tensor) -> Tensor:
        return self.regressor(x)


def shape_matching_conv(student_shape: Sequence[int], teacher_shape: Sequence[int], owner: str) -> nn.Module:
    """The convolution that maps a ``(B, C_s, H_s, W_s)`` student map to the teacher's ``(B, C_t, H_t, W_t)``.

    The choice of the CRD benchmark's ``ConvReg`` (FitNet's regressor, AB's connector), made on the heights:

    - ``H_s == 2 H_t``: 3x3 conv, stride 2, padding 1;
    - ``2 H_s == H_t``: 4x4 transposed conv, stride 2, padding 1;
    - otherwise ``H_s >= H_t``: a "valid" conv (no padding) with kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``, so
      1x1 for equal sizes.

    The convolution keeps PyTorch's default initialisation and its bias, as in the reference. A student map
    smaller than the teacher's other than by half, or a width that does not come out as ``W_t``, raises a
    ``ValueError`` naming both shapes (``owner`` names the module in the message).
    """
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ValueError(
            f"{owner} needs (B, C, H, W) maps, got student {tuple(student_shape)} and teacher "
            f"{tuple(teacher_shape)}: choose convolutional layers"
        )
    (_, c_s, h_s, w_s), (_, c_t, h_t, w_t) = student_shape, teacher_shape
    conv: nn.Module
    if h_s == 2 * h_t:
        conv, width = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1), (w_s - 1) // 2 + 1
    elif 2 * h_s == h_t:
        conv, width = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1), 2 * w_s
    elif h_s >= h_t and w_s >= w_t:
        conv, width = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t)), w_t
    else:
        width = -1
    if width != w_t:
        raise ValueError(
            f"{owner} maps the student map to a teacher map of the same, half or twice its spatial size, or of "
            f"any smaller size (a valid conv), the case read from the heights; got student {tuple(student_shape)} "
            f"and teacher {tuple(teacher_shape)}: choose layers whose sizes match that way"
        )
    return conv


class ABConnector(nn.Module):
    """AB's map from the student's pre-activation map to the teacher's (the CRD benchmark's ``Connector``).

    ``mode="reference"`` (default): the identity when the channel count and the spatial size agree, else
    conv + BatchNorm (no ReLU), the conv chosen by :func:`shape_matching_conv` (3x3 stride-2 conv for a
    student map twice the teacher's size, 4x4 stride-2 transposed conv for half, a valid conv otherwise).
    ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)``.

    ``mode="pool"``, **a departure from the reference**: the identity when the channel counts agree, else a
    1x1 conv (no bias, Kaiming-normal fan-out) + BatchNorm; the spatial size is kept, and
    :func:`~lightning_kd.functional.ab_loss` then average-pools the larger of the two maps to the other's size.
    ``(B, C_s, H_s, W_s) -> (B, C_t, H_s, W_s)``.
    """

    MODES = ("reference", "pool")

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], mode: str = "reference") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"AB connector mode must be one of {self.MODES}, got {mode!r}")
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ValueError(
                f"the AB connector needs (B, C, H, W) maps, got student {tuple(student_shape)} and teacher "
                f"{tuple(teacher_shape)}: choose convolutional layers such as 'preact1'"
            )
        c_s, c_t = student_shape[1], teacher_shape[1]
        self.mode = mode
        if mode == "pool":
            if c_s == c_t:
                self.net: nn.Module = nn.Identity()
            else:
                conv = nn.Conv2d(c_s, c_t, 1, bias=False)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                self.net = nn.Sequential(conv, nn.BatchNorm2d(c_t))
        elif tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
            self.net = nn.Identity()
        else:
            conv = shape_matching_conv(student_shape, teacher_shape, "the AB connector")
            self.net = nn.Sequential(conv, nn.BatchNorm2d(c_t))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _conv_block(conv: nn.Module, channels: int, use_bn: bool) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels) if use_bn else nn.Identity(), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's teacher-side auto-encoder.

    Encoder: conv3x3 ``C -> C``, ``C -> kC``, ``kC -> kC``; decoder the mirror image with transposed convs
    (``kC -> kC``, ``kC -> C``, ``C -> C``); LeakyReLU(0.1) after each, BatchNorm before it if ``use_bn``
    (as in the FT authors' code; the CRD benchmark's has none). ``k`` is the paraphrase rate.
    """

    def __init__(self, channels: int, rate: float = 0.5, use_bn: bool = True) -> None:
        super().__init__()
        if rate <= 0:
            raise ValueError(f"FT paraphrase rate must be positive, got {rate}")
        factor = max(1, int(channels * rate))
        self.factor_channels = factor
        bias = not use_bn
        self.encoder = nn.Sequential(
            *_conv_block(nn.Conv2d(channels, channels, 3, 1, 1, bias=bias), channels, use_bn),
            *_conv_block(nn.Conv2d(channels, factor, 3, 1, 1, bias=bias), factor, use_bn),
            *_conv_block(nn.Conv2d(factor, factor, 3, 1, 1, bias=bias), factor, use_bn),
        )
        self.decoder = nn.Sequential(
            *_conv_block(nn.ConvTranspose2d(factor, factor, 3, 1, 1, bias=bias), factor, use_bn),
            *_conv_block(nn.ConvTranspose2d(factor, channels, 3, 1, 1, bias=bias), channels, use_bn),
            *_conv_block(nn.ConvTranspose2d(channels, channels, 3, 1, 1, bias=bias), channels, use_bn),
        )

    def encode(self, x: Tensor) -> Tensor:
        """The teacher factor ``F_t``: ``(B, C, H, W) -> (B, kC, H, W)``."""
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """FT's student-side encoder: conv3x3 ``C_s -> C_s``, ``C_s -> C_out``, ``C_out -> C_out``, each followed
    by BatchNorm (if ``use_bn``) and LeakyReLU(0.1); ``C_out`` is the paraphraser's factor size."""

    def __init__(self, in_channels: int, out_channels: int, use_bn: bool = True) -> None:
        super().__init__()
        bias = not use_bn
        self.encoder = nn.Sequential(
            *_conv_block(nn.Conv2d(in_channels, in_channels, 3, 1, 1, bias=bias), in_channels, use_bn),
            *_conv_block(nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=bias), out_channels, use_bn),
            *_conv_block(nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias), out_channels, use_bn),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


# -- CRD benchmark methods (FitNet connector) --
class HintRegressor(nn.Module):
    """FitNet's regressor (the CRD benchmark's ``ConvReg``): maps a ``(B, C_s, H_s, W_s)`` student map to the
    teacher's ``(B, C_t, H_t, W_t)``.

    conv + BN + ReLU, the conv chosen by :func:`shape_matching_conv` from the spatial sizes:

    - student twice the teacher's size: 3x3 conv, stride 2, padding 1;
    - student half the teacher's size: 4x4 transposed conv, stride 2, padding 1;
    - student larger or equal otherwise: a valid conv with kernel ``(1 + H_s - H_t, 1 + W_s - W_t)`` (1x1 for
      equal sizes).

    A smaller student map (other than by half) raises a ``ValueError`` naming both shapes.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = shape_matching_conv(student_shape, teacher_shape, "the FitNet regressor")
        self.bn = nn.BatchNorm2d(teacher_shape[1])
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


