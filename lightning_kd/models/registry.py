"""Build any bundled model by name: ``create_model("resnet8x4", num_classes=100)``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def init_weights(model: nn.Module, linear: Literal["default", "zero_bias", "normal"] = "default") -> None:
    """The zoo's initialisation, in one pass over ``model.modules()`` (the random draws come in module order).

    - ``nn.Conv2d``: Kaiming-normal weights (fan-out, ReLU gain), the bias (where there is one) at 0;
    - ``nn.BatchNorm2d``: weight 1, bias 0;
    - ``nn.Linear``: ``"default"`` keeps PyTorch's initialisation (the CIFAR ResNets, ResNet50);
      ``"zero_bias"`` sets only the bias to 0 (WRN); ``"normal"`` draws the weight from N(0, 0.01^2) and sets the
      bias to 0 (VGG, MobileNetV2).
    """
    if linear not in ("default", "zero_bias", "normal"):
        raise ValueError(f"linear must be 'default', 'zero_bias' or 'normal', got {linear!r}")
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear != "default":
            if linear == "normal":
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def feature_module_paths(model: nn.Module) -> list[str] | None:
    """The module paths of ``model``'s feature path, in forward order, or ``None`` if it declares none.

    Read from ``model.feature_modules``. For the bundled models these are the modules of the CRD benchmark's
    ``get_feat_modules()``: the ones its initialisation stages (AB, FT, FSP) train, in train mode, while the
    rest (classifier, and e.g. WRN's final BN or MobileNetV2's last 1x1 conv) stay in eval mode, out of the
    optimizer. Each path is checked against ``model.named_modules()``.
    """
    paths = getattr(model, "feature_modules", None)
    if paths is None:
        return None
    modules = dict(model.named_modules())
    unknown = [path for path in paths if path not in modules]
    if unknown:
        raise ValueError(
            f"{type(model).__name__}.feature_modules names modules it does not have: {unknown}; expected paths of "
            "model.named_modules() such as 'layer1'"
        )
    return list(paths)


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
    classifier reads), ``classifier``; and, where the pre-activation is a BatchNorm's output (plus the
    residual), ``preact1_norm..preactN_norm`` naming that BatchNorm (for OFD). Its ``feature_modules`` list
    names the modules of the feature path (see :func:`feature_module_paths`).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def build_network(
    spec: Any, num_classes: int = 100, feature_paths: Mapping[str, str] | None = None, who: str = "network"
) -> nn.Module:
    """A network from a bundled model's name, a dotted class or function path (``torchvision.models.resnet18``,
    called with ``num_classes`` when it accepts it), a ``{"class_path": ..., "init_args": ...}`` config, or a module
    (returned as it is). ``feature_paths`` (symbolic tap names, see :mod:`lightning_kd.taps`) are merged over the
    network's own."""
    from lightning_kd.hparams import import_class, instantiate

    if spec is None:
        raise ValueError(
            f"the {who} is None: name a bundled model or pass a network (a network given as a module is not part of "
            f"a checkpoint's hyperparameters: pass {who}=... to load_from_checkpoint again)"
        )
    if isinstance(spec, nn.Module):
        network = spec
    elif isinstance(spec, Mapping):
        network = instantiate(spec, nn.Module, who)
    elif isinstance(spec, str) and spec in _REGISTRY:
        network = create_model(spec, num_classes=num_classes)
    elif isinstance(spec, str) and "." in spec:
        factory = import_class(spec)
        parameters = inspect.signature(factory).parameters.values()
        accepts = any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        network = factory(num_classes=num_classes) if accepts else factory()
    elif isinstance(spec, str):
        create_model(spec)  # raises with the known names and close matches
        raise AssertionError  # pragma: no cover
    else:
        raise TypeError(f"the {who} must be an nn.Module, a bundled model's name or a class path, got {type(spec).__name__}")
    if feature_paths:
        network.feature_paths = {**(getattr(network, "feature_paths", None) or {}), **dict(feature_paths)}
    return network
