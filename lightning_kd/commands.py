"""``lightning-kd export`` and ``lightning-kd layers``: the commands that are not training runs.

    lightning-kd export outputs/digits/logs/version_0/checkpoints/last.ckpt --output student.pt
    lightning-kd export RUN.ckpt --output student.pt2 --format exported --input-size 3 32 32
    lightning-kd layers resnet32x4 --input-size 3 32 32
    lightning-kd layers torchvision.models.mobilenet_v3_small --num-classes 10 --input-size 3 224 224
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_kd.checkpoints import CheckpointError, is_lightning_checkpoint, load_weights_file
from lightning_kd.models import build_network

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------
def student_from_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a distillation (or teacher) checkpoint, rebuilt from its saved hyperparameters and loaded
    with its weights; the teacher and the distillers are not needed."""
    loaded = load_weights_file(path)
    if not is_lightning_checkpoint(loaded):
        raise CheckpointError(f"{os.fspath(path)!r} is not a checkpoint written by a fit (no 'state_dict' entry)")
    hparams = loaded.get("hyper_parameters") or {}
    spec = hparams.get("student")
    if spec is None:
        raise CheckpointError(
            f"{os.fspath(path)!r} does not name its student network (it was given as a module in Python): load "
            "the checkpoint with DistillationModule.load_from_checkpoint(path, student=...) and call export_student"
        )
    student = build_network(spec, int(hparams.get("num_classes", 100)))
    state = {k[len("student.") :]: v for k, v in loaded["state_dict"].items() if k.startswith("student.")}
    student.load_state_dict(state, strict=True)
    return student.eval(), hparams


def export(checkpoint: str, output: str, fmt: str = "state_dict", input_size: Sequence[int] | None = None) -> str:
    """Write a checkpoint's student alone: a plain state dict (default; load it into the same network with
    ``weights_only=True``) or a ``torch.export`` program (``"exported"``: load it with
    ``torch.export.load(path).module()``, no Python class needed; the batch size stays free)."""
    student, hparams = student_from_checkpoint(checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if fmt == "state_dict":
        torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, output)
    elif fmt == "exported":
        size = tuple(input_size or hparams.get("input_size") or (3, 32, 32))
        example = torch.randn(2, *size)
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(student, (example,), dynamic_shapes=({0: batch},))
        with torch.no_grad():
            if not torch.allclose(program.module()(example), student(example), atol=1e-5):
                raise RuntimeError("the exported program does not reproduce the student's output")
        torch.export.save(program, output)
    else:
        raise ValueError(f"--format must be 'state_dict' or 'exported', got {fmt!r}")
    return output


def export_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-kd export", description="Write the student of a checkpoint alone (no teacher, no distillers)."
    )
    parser.add_argument("checkpoint", help="a checkpoint written by lightning-kd fit")
    parser.add_argument("--output", "-o", default="student.pt", help="where to write it (default: student.pt)")
    parser.add_argument("--format", default="state_dict", choices=("state_dict", "exported"),
                        help="a plain state dict, or a torch.export program that needs no Python class")
    parser.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                        help="example input for torch.export (default: the run's input_size)")  # fmt: skip
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.output, args.format, args.input_size)
    sys.stdout.write(f"student written to {path} ({args.format})\n")


# ----------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------
def layer_table(network: nn.Module, input_size: Sequence[int]) -> list[tuple[str, str, str]]:
    """``(module path, type, output shape)`` of every module, in forward order, for one input of ``input_size``
    (batch of 2), plus the symbolic tap names of ``network.feature_paths``."""
    rows: dict[str, tuple[str, str, str]] = {}
    handles = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: Any, output: Any) -> None:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            rows.setdefault(name, (name, type(module).__name__, str(shape)))

        return record

    for name, module in network.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            was_training = network.training
            network.eval()
            logits = network(torch.zeros(2, *input_size))
            network.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    table = list(rows.values())
    table.append(("logits", "output", str(tuple(logits.shape))))
    return table


def layers_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-kd layers",
        description="List every module path of a network with its output shape, to choose taps "
        "(student_layers / teacher_layers, student_feature_paths).",
    )
    parser.add_argument("network", help="a bundled model's name or a dotted path, e.g. torchvision.models.resnet18")
    parser.add_argument("--input-size", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args(argv)
    network = build_network(args.network, args.num_classes)
    table = layer_table(network, args.input_size)
    width = max(len(r[0]) for r in table)
    kind = max(len(r[1]) for r in table)
    lines = [f"{'module path':<{width}}  {'type':<{kind}}  output shape (batch 2)"]
    lines += [f"{path:<{width}}  {typ:<{kind}}  {shape}" for path, typ, shape in table]
    paths = getattr(network, "feature_paths", None) or {}
    if paths:
        lines.append("")
        lines.append("symbolic tap names (feature_paths):")
        lines += [f"  {name:<12} -> {path}" for name, path in paths.items()]
    lines.append("")
    lines.append("A tap is a module path (its output), 'path:input' (its input) or 'logits'.")
    sys.stdout.write("\n".join(lines) + "\n")
