"""The batch format: a dictionary with ``image`` (B, C, H, W) and ``label`` (B,), and, when asked for, ``index``,
``contrast_index`` (CRD), the view parameters ``crop_top``/``crop_left``/``flip`` and further views
``image_<view>`` (MLKD's ``image_strong``). A distiller reads a tap on another view as ``"<tap>@<view>"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Batch = dict[str, Any]

#: batch key of the default view; a view ``v`` is read from ``batch["image_" + v]``
IMAGE = "image"
VIEW_SEPARATOR = "@"


def as_batch(batch: Any) -> Batch:
    """Accept the library's dictionary batches and plain ``(images, labels, ...)`` tuples alike."""
    if isinstance(batch, Mapping):
        if IMAGE not in batch or "label" not in batch:
            raise KeyError(f"a batch dictionary needs 'image' and 'label' keys, found {sorted(batch)}")
        return dict(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        named = {IMAGE: batch[0], "label": batch[1]}
        if len(batch) > 2:
            named["index"] = batch[2]
        if len(batch) > 3:
            named["contrast_index"] = batch[3]
        return named
    raise TypeError(f"expected a batch dictionary or an (images, labels, ...) tuple, found {type(batch).__name__}")


def split_view(tap: str) -> tuple[str, str | None]:
    """``"logits@strong"`` -> ``("logits", "strong")``; a tap without a view -> ``(tap, None)``."""
    base, _, view = tap.partition(VIEW_SEPARATOR)
    return base, (view or None)
