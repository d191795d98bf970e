"""Building blocks of the loss tests' second computations: plain Python floats (double precision), no torch ops,
no code shared with the library. Pooling follows the definition of adaptive average pooling.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def nested(x: torch.Tensor | list) -> list:
    """A tensor as nested lists of Python floats (lists pass through)."""
    return x.detach().double().tolist() if isinstance(x, torch.Tensor) else x


def pool(fmap: list, out_h: int, out_w: int) -> list:
    """Adaptive average pooling of one ``(C, H, W)`` nested list: bins ``floor(i in / out) .. ceil((i + 1) in / out)``."""
    in_h, in_w = len(fmap[0]), len(fmap[0][0])
    pooled = []
    for channel in fmap:
        rows = []
        for i in range(out_h):
            h0, h1 = (i * in_h) // out_h, -((-(i + 1) * in_h) // out_h)
            row = []
            for j in range(out_w):
                w0, w1 = (j * in_w) // out_w, -((-(j + 1) * in_w) // out_w)
                cells = [channel[h][w] for h in range(h0, h1) for w in range(w0, w1)]
                row.append(sum(cells) / len(cells))
            rows.append(row)
        pooled.append(rows)
    return pooled


def match(s: torch.Tensor | list, t: torch.Tensor | list) -> tuple[list, list]:
    """Pool every sample of two ``(B, C, H, W)`` maps to the smaller height and the smaller width."""
    s, t = nested(s), nested(t)
    h = min(len(s[0][0]), len(t[0][0]))
    w = min(len(s[0][0][0]), len(t[0][0][0]))
    return [pool(x, h, w) for x in s], [pool(x, h, w) for x in t]


def flat(grid: list) -> list[float]:
    """The values of a 2-D nested list, row after row."""
    return [v for row in grid for v in row]


def rows(x: torch.Tensor) -> list[list[float]]:
    """Each sample of a ``(B, ...)`` tensor as one flat list."""
    return x.detach().double().reshape(x.shape[0], -1).tolist()


def unit(v: list[float]) -> list[float]:
    """``v / max(|v|, 1e-12)``: a zero vector stays zero."""
    norm = max(math.sqrt(sum(x * x for x in v)), EPS)
    return [x / norm for x in v]
