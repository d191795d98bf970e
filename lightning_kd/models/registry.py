"""Build any bundled model by name: ``create_model("resnet8x4", num_classes=100)``."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def init_conv_bn(model: nn.Module) -> None:
    """The zoo's initialisation: Kaiming-normal (fan-out) convolutions, BatchNorm at weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name (used as a decorator)."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """Build the bundled model ``name`` with ``num_classes`` outputs.

    Every bundled model has a ``feature_paths`` dictionary naming its tap points: ``stem``,
    ``stage1..N``, ``preact1..N`` (before each stage's last ReLU), ``embedding`` (the pooled features the
    classifier reads), ``classifier``.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)
