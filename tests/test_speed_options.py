"""Speed options give the same losses as the default on a fixed batch (bf16 tolerance where precision changes)."""

from __future__ import annotations

import pytest
import torch

from lightning_kd import DistillationModule
from lightning_kd.distillers import KD, Distiller

SMALL = dict(num_classes=10, input_size=(3, 16, 16))


class StageMeans(Distiller):
    """A feature-level test loss: squared difference of the channel means of stage 2 (same channel counts)."""

    default_student_layers = ("stage2",)

    def forward(self, student, teacher, batch):
        return (student[0].float().mean(dim=(2, 3)) - teacher[0].float().mean(dim=(2, 3))).pow(2).mean()


def _losses(**options) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = DistillationModule(
        "resnet8", teacher="resnet14", distillers=[KD(), StageMeans(name="means")], **SMALL, **options
    )
    module.configure_model()
    torch.manual_seed(1)
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.randint(0, 10, (8,))}
    losses = module.core.compute_losses(batch).losses
    return {k: v.detach() for k, v in losses.items()}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return _losses()


def test_channels_last_gives_the_same_losses(reference: dict[str, torch.Tensor]) -> None:
    got = _losses(channels_last=True)
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)


def test_bf16_teacher_is_close_and_fp32_out(reference: dict[str, torch.Tensor]) -> None:
    got = _losses(teacher_precision="bf16")
    torch.testing.assert_close(got["ce"], reference["ce"])  # the student is untouched
    torch.testing.assert_close(got["kd"], reference["kd"], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(got["means"], reference["means"], rtol=5e-2, atol=5e-3)
    assert got["kd"].dtype == torch.float32
    assert not torch.equal(got["kd"], reference["kd"])  # the teacher really ran in bf16


def test_compiled_networks_give_the_same_losses_and_keep_taps(reference: dict[str, torch.Tensor]) -> None:
    got = _losses(compile=True)  # "means" reads stage2 through the taps of the compiled networks
    assert set(got) == set(reference) == {"ce", "kd", "means"}
    for name, value in reference.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5)
    module = DistillationModule("resnet8", compile=True, **SMALL)
    module.configure_model()
    assert all(not k.startswith("_orig_mod") for k in module.student.state_dict())


def test_bad_teacher_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="teacher_precision"):
        DistillationModule("resnet8", **SMALL, teacher_precision="int8")
