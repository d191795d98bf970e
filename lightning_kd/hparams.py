"""Objects as configuration: what a distiller was built with, and building one back from that.

Every :class:`~lightning_kd.distillers.Distiller` remembers its constructor arguments (:class:`RemembersInit`), so
a :class:`~lightning_kd.DistillationModule` made in Python saves hyperparameters that rebuild it
(``DistillationModule.load_from_checkpoint``), in the ``{"class_path": ..., "init_args": {...}}`` form that
LightningCLI configs use. :func:`instantiate` turns that form (or an object already built) into the object.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class RemembersInit:
    """Mixin: the arguments an instance was constructed with, as a config dictionary (:meth:`init_config`)."""

    def __new__(cls, *args: Any, **kwargs: Any):  # noqa: ANN204
        instance = super().__new__(cls)
        instance.__dict__["_init_call"] = (args, kwargs)
        return instance

    def init_config(self) -> dict[str, Any]:
        """``{"class_path": "pkg.module.Class", "init_args": {...}}`` with the arguments given explicitly.

        Raises:
            TypeError: an argument is not plain data (numbers, strings, lists, dictionaries, None) nor an object
                with an ``init_config`` of its own.
        """
        args, kwargs = self.__dict__.get("_init_call", ((), {}))
        bound_call = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
        bound_call.apply_defaults()
        bound = bound_call.arguments
        bound.pop("self", None)
        init_args: dict[str, Any] = {}
        for name, value in bound.items():
            kind = inspect.signature(type(self).__init__).parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                init_args.update({k: as_config(v, f"{type(self).__name__}.{k}") for k, v in value.items()})
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(self).__name__} takes *args, which a config cannot name")
            else:
                init_args[name] = as_config(value, f"{type(self).__name__}.{name}")
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}


def as_config(value: Any, where: str) -> Any:
    """``value`` as plain configuration data (recursively); objects must offer ``init_config()``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [as_config(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): as_config(v, where) for k, v in value.items()}
    if hasattr(value, "init_config"):
        return value.init_config()
    raise TypeError(f"{where} = {value!r} ({type(value).__name__}) cannot be written as configuration data")


def import_class(path: str) -> type:
    """The class named by a dotted path (``"lightning_kd.distillers.KD"``)."""
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {path!r} must be a dotted path such as 'lightning_kd.distillers.KD'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"class_path {path!r}: cannot import module {module_name!r} ({error})") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"class_path {path!r}: module {module_name!r} has no {name!r}") from None


def instantiate(spec: Any, base: type[T], what: str = "object") -> T:
    """``spec`` itself when it is a ``base`` instance, else build it from ``{"class_path", "init_args"}`` (nested
    specs in the arguments are built too)."""
    if isinstance(spec, base) and not (isinstance(spec, Mapping) and "class_path" in spec):
        return spec
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise TypeError(
            f"a {what} must be a {base.__name__} or a {{'class_path': ..., 'init_args': {{...}}}} mapping, got "
            f"{type(spec).__name__}: {spec!r}"
        )
    cls = import_class(str(spec["class_path"]))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{what} class_path {spec['class_path']!r} is not a {base.__name__}")
    init_args = {k: _build_nested(v) for k, v in dict(spec.get("init_args") or {}).items()}
    return cls(**init_args)


def _build_nested(value: Any) -> Any:
    if isinstance(value, Mapping) and "class_path" in value:
        return instantiate(value, object)
    if isinstance(value, list):
        return [_build_nested(v) for v in value]
    return value


def clean_module_hparams(hparams: dict[str, Any], distillers: list) -> None:
    """Make a module's saved hyperparameters plain data that rebuilds it, in place.

    LightningCLI hands over the parsed config (plain data already). Built in Python: a network given as a module
    becomes None (pass it again to ``load_from_checkpoint``), distiller objects become ``{"class_path",
    "init_args"}``, and optimizer or schedule factories, which are code, are left out (the defaults apply unless
    they are passed again).
    """
    from torch import nn

    for key in ("student", "teacher"):
        if isinstance(hparams.get(key), nn.Module):
            hparams[key] = None
    given = hparams.get("distillers")
    if given and not all(isinstance(d, Mapping) for d in given):
        try:
            hparams["distillers"] = [as_config(d, "distillers") for d in distillers]
        except TypeError:
            del hparams["distillers"]  # pass them to load_from_checkpoint
    for key in ("optimizer", "lr_scheduler"):
        if hparams.get(key) is not None and not isinstance(hparams[key], Mapping):
            del hparams[key]
