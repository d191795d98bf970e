"""Feature taps: forward hooks that capture intermediate tensors by module path.

A *tap* names a point inside a network:

- ``"layer3"``: the output of the sub-module ``layer3`` (any path of ``model.named_modules()``);
- ``"fc:input"``: the (first) input of ``fc``; for the bundled models that is the pooled embedding;
- ``"logits"``: the network's own output (no hook is needed);
- a symbolic name such as ``"stage2"``, ``"preact3"`` or ``"embedding"``, looked up in the model's
  ``feature_paths`` dictionary (every bundled model has one; see :mod:`lightning_kd.models`);
- a group, expanded by :func:`expand_taps` from ``feature_paths``: ``"stages"`` (every ``stageN`` in order),
  ``"preacts"`` (every ``preactN``), ``"last_stage"`` and ``"last_preact"``. Distillers use groups as
  defaults, so a 3-stage ResNet and a 4-stage VGG each give all their stages.

Example:
    >>> import torch
    >>> from lightning_kd.models import create_model
    >>> net = create_model("resnet8", num_classes=10)
    >>> taps = FeatureTaps(net, ["stage3", "embedding"])
    >>> logits = net(torch.zeros(2, 3, 32, 32))
    >>> {name: tuple(t.shape) for name, t in taps.pop().items()}
    {'stage3': (2, 64, 8, 8), 'embedding': (2, 64)}
    >>> taps.remove()
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LOGITS = "logits"
INPUT_SUFFIX = ":input"


GROUPS = {"stages": "stage", "preacts": "preact", "last_stage": "stage", "last_preact": "preact"}


class TapError(ValueError):
    """A tap names a point that does not exist in the network."""

    #: ``"student"`` or ``"teacher"``: the network whose tap failed, when known (set by ``resolve_layers``)
    role: str | None = None


def layers_hint(error: TapError, specs: dict[str, object], num_classes: int, input_size: Sequence[int]) -> TapError:
    """``error`` with the command that lists the failing network's module paths and shapes appended: for any
    network without the symbolic names a distiller's default layers use, the user has to name layers."""
    spec = specs.get(error.role or "")
    if isinstance(spec, str):
        name = spec
    elif isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str):
        name = spec["class_path"]
    elif isinstance(getattr(spec, "class_path", None), str):  # a config namespace
        name = spec.class_path  # type: ignore[union-attr]
    else:
        name = "NETWORK"
    size = " ".join(str(int(v)) for v in input_size)
    who = f"the {error.role}'s" if error.role else "a network's"
    hinted = TapError(
        f"{str(error).rstrip('.')}. To list {who} module paths and output shapes: "
        f"lightning-kd layers {name} --num-classes {num_classes} --input-size {size}"
    )
    hinted.role = error.role
    return hinted


def _numbered(feature_paths: dict[str, str], prefix: str) -> list[str]:
    names = [n for n in feature_paths if n.startswith(prefix) and n[len(prefix) :].isdigit()]
    return sorted(names, key=lambda n: int(n[len(prefix) :]))


def expand_taps(model: nn.Module, taps: Iterable[str]) -> list[str]:
    """Replace the groups (``stages``, ``preacts``, ``last_stage``, ``last_preact``) by the model's taps."""
    feature_paths: dict[str, str] = getattr(model, "feature_paths", {}) or {}
    expanded: list[str] = []
    for tap in taps:
        if tap not in GROUPS:
            expanded.append(tap)
            continue
        names = _numbered(feature_paths, GROUPS[tap])
        if not names:
            raise TapError(
                f"{type(model).__name__} has no {GROUPS[tap]}N entries in feature_paths, so the group {tap!r} "
                "cannot be expanded: name the layers explicitly (student_layers=[...] / teacher_layers=[...])"
            )
        expanded.extend(names[-1:] if tap.startswith("last_") else names)
    return expanded


def resolve_tap(model: nn.Module, tap: str) -> tuple[str, bool]:
    """Turn a tap name into ``(module_path, capture_input)``; raises :class:`TapError` if unknown.

    Symbolic names are looked up in ``model.feature_paths`` first. ``"logits"`` resolves to ``("", False)``
    and is captured from the network's return value rather than by a hook.
    """
    if tap == LOGITS:
        return "", False
    feature_paths: dict[str, str] = getattr(model, "feature_paths", {}) or {}
    path = feature_paths.get(tap, tap)
    capture_input = path.endswith(INPUT_SUFFIX)
    if capture_input:
        path = path[: -len(INPUT_SUFFIX)]
    modules = dict(model.named_modules())
    if path not in modules or path == "":
        known = [name for name in modules if name] + list(feature_paths)
        close = difflib.get_close_matches(path, known, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        symbolic = f" Symbolic names of this model: {', '.join(feature_paths)}." if feature_paths else ""
        raise TapError(
            f"No module {path!r} in {type(model).__name__} (tap {tap!r}).{hint}{symbolic} "
            f"Use a path from model.named_modules(), optionally with {INPUT_SUFFIX!r}, or {LOGITS!r}."
        )
    return path, capture_input


class FeatureTaps:
    """Forward hooks on one network that store the tensors of the named taps during each forward.

    The hooks stay attached until :meth:`remove`; each forward overwrites the stored tensors, and
    :meth:`pop` hands them over (and forgets them, so no graph is kept alive between steps).
    ``"logits"`` is not hooked: the caller adds the network's output itself. An input tap is captured before its
    module runs (a forward pre-hook).

    Networks that compute in place (torchvision's ResNets: ``ReLU(inplace=True)``, ``out += identity``) overwrite a
    tapped tensor after it was captured, so the tap would read a later value (the input of ``relu`` would read its
    output). :meth:`pop` notices it (the tensor's version counter moved) and from then on that tap keeps a copy taken
    when it is captured; the probe forward a :class:`~lightning_kd.core.Distillation` makes at construction finds
    such taps before any training step.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self.versions: dict[str, int] = {}
        self._captures: dict[str, _Capture] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        modules = dict(model.named_modules())
        for tap in dict.fromkeys(taps):  # unique, in order
            path, capture_input = resolve_tap(model, tap)
            if not path:
                continue
            capture = _Capture(self.features, self.versions, tap, capture_input)
            self._captures[tap] = capture
            module = modules[path]
            hook = module.register_forward_pre_hook if capture_input else module.register_forward_hook
            self._handles.append(hook(capture))

    def pop(self) -> dict[str, Tensor]:
        """Return the tensors captured by the last forward and forget them."""
        for tap, value in self.features.items():
            # Tensor._version counts in-place writes: the only way to see that a captured tensor was overwritten
            if value._version != self.versions.get(tap) and not self._captures[tap].copy:
                self._captures[tap].copy = True
                log.info("Tap %r is overwritten in place after it is read: it keeps a copy from now on.", tap)
        features = dict(self.features)
        self.features.clear()
        return features

    @property
    def copied(self) -> list[str]:
        """The taps that keep a copy because their network overwrites them in place."""
        return [tap for tap, capture in self._captures.items() if capture.copy]

    def remove(self) -> None:
        """Detach every hook; the network is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features.clear()

    def __len__(self) -> int:
        return len(self._handles)


class _Capture:
    """The hook itself: a small picklable object (``ddp_spawn`` pickles the module with its hooks). Registered as
    a forward pre-hook for an input tap (``(module, args)``), as a forward hook otherwise (``(module, args, out)``)."""

    def __init__(self, store: dict[str, Tensor], versions: dict[str, int], tap: str, capture_input: bool) -> None:
        self.store, self.versions, self.tap, self.capture_input = store, versions, tap, capture_input
        self.copy = False

    def __call__(self, module: nn.Module, args: tuple, output: object = None) -> None:
        value = args[0] if self.capture_input else output
        if self.copy:
            value = value.clone()
        self.store[self.tap] = value
        self.versions[self.tap] = value._version
