"""Loading weights files safely: always ``torch.load(..., weights_only=True)``, with clear errors.

A file that carries anything but tensors and plain containers (a pickled object, code) is refused without
being unpickled; a truncated or corrupt file is an error that says so.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from typing import Any

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A weights file cannot be used: unsafe, corrupt, or not matching the network."""


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_BYTE = 0x80


def load_weights_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors a user can act on.

    Tells apart a file that is not a PyTorch weights file at all (text, an image, an HTML error page), a
    truncated or corrupt one, and one that holds pickled objects (refused without being unpickled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file {path!r} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CheckpointError(f"cannot read {path!r}: the file is empty")
    if head != ZIP_MAGIC and head[0] != PICKLE_PROTOCOL_BYTE:
        raise CheckpointError(
            f"{path!r} is not a PyTorch weights file (it starts with {head!r}; a file written by torch.save starts "
            "with a zip header): check the path"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refused to load {path!r}: it is not a plain weights file (it holds objects that only a full "
            f"unpickle could build, which can run arbitrary code). Save a state dict instead "
            f"(torch.save(model.state_dict(), path)). Detail: {str(error).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"cannot read {path!r}: the file is truncated or corrupt ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from None


def is_lightning_checkpoint(loaded: Any) -> bool:
    """Whether a loaded file is a Lightning checkpoint (a ``state_dict`` entry beside the loop states)."""
    return isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"lightning"`` for a checkpoint written by a fit, ``"state_dict"`` for a plain state dict (an exported
    network); raises :class:`CheckpointError` for anything else."""
    loaded = load_weights_file(path)
    if is_lightning_checkpoint(loaded):
        return "lightning"
    if isinstance(loaded, dict) and loaded and all(isinstance(v, Tensor) for v in loaded.values()):
        return "state_dict"
    raise CheckpointError(f"{os.fspath(path)!r} is neither a Lightning checkpoint nor a state dict of tensors")


def check_resume_checkpoint(path: str | os.PathLike, module: nn.Module) -> None:
    """Before Lightning loads ``path`` into ``module``: the checkpoint's weights must fit the module's (a teacher's
    checkpoint given to resume a distillation is the common mistake). Raises one short :class:`CheckpointError`
    instead of thousands of characters of key names."""
    loaded = load_weights_file(path)
    saved_by_library = loaded.get("lightning_kd")
    if (
        isinstance(saved_by_library, dict)
        and saved_by_library.get("teacher_fingerprint") is None
        and getattr(module, "teacher", None) is not None
    ):
        raise CheckpointError(
            f"{os.fspath(path)!r} is the checkpoint of a network trained alone (a teacher run?), not of a "
            "distillation: give it as model.teacher_checkpoint and start the distillation without --ckpt_path"
        )
    state = loaded["state_dict"]
    own = module.state_dict()
    relevant = {k for k in own if not k.startswith("teacher.")}
    saved = {k for k in state if not k.startswith("teacher.")}
    missing, unexpected = sorted(relevant - saved), sorted(saved - relevant)
    mismatched = [k for k in relevant & saved if tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    hint = ""
    if _has_distillers(own) and not _has_distillers(state):
        hint = " It looks like a checkpoint of a network trained alone (a teacher?): use it as model.teacher_checkpoint."
    raise CheckpointError(
        f"{os.fspath(path)!r} does not fit this run: {len(missing)} of its weights are missing (e.g. "
        f"{', '.join(missing[:3]) or '-'}), {len(unexpected)} are not part of this run (e.g. "
        f"{', '.join(unexpected[:3]) or '-'}), {len(mismatched)} differ in shape (e.g. {', '.join(mismatched[:3]) or '-'})."
        f"{hint} A checkpoint resumes the run that wrote it, with the same networks and distillers."
    )


def _has_distillers(state: dict[str, Any]) -> bool:
    return any(k.startswith("distillers.") for k in state)


def extract_state_dict(loaded: Any, prefix: str = "student.") -> dict[str, Tensor]:
    """The network's state dict from a loaded file.

    Accepts a plain state dict, or a Lightning checkpoint of this library (``{"state_dict": ...}``), from
    which the ``prefix`` entries (by default the student of a :class:`~lightning_kd.DistillationModule`,
    which is how teachers are trained) are taken with the prefix stripped.
    """
    if not isinstance(loaded, dict):
        raise CheckpointError(f"expected a state dict (a dictionary of tensors), found {type(loaded).__name__}")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        state = loaded["state_dict"]
        picked = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not picked:
            raise CheckpointError(
                f"the Lightning checkpoint has no {prefix!r} entries; its keys start with "
                f"{sorted({key.split('.')[0] for key in state})}"
            )
        return picked
    return loaded


def load_into(model: nn.Module, path: str | os.PathLike, what: str = "model") -> None:
    """Load a weights file into ``model`` strictly; missing or unexpected keys are a listed error."""
    state = extract_state_dict(load_weights_file(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs {what} {tuple(own[key].shape)}"
        for key in own
        if key in state and isinstance(state[key], Tensor) and state[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{path} does not fit the {what} ({type(model).__name__}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if mismatched:
            lines.append(f"  shape mismatches: {'; '.join(mismatched[:10])}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def fingerprint(network: nn.Module) -> str:
    """sha256 over a network's state dict (sorted names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(network.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
