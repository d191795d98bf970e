"""Relational distillers (RKD, PKT, SP, CC) inside the DistillationModule: the CRD benchmark's defaults, the
forward as the pure loss summed over layer pairs, the batch scope option, CC's learnable embeddings, and short fits.

Their global scope on one process and batches of one are checked for every relational method by
tests/test_conformance.py; two processes by tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_two_steps_train, small_batch, small_module
from lightning_kd.distillers import CC, PKT, RKD, SP
from lightning_kd.functional import cc_loss, pkt_loss, rkd_loss, sp_loss


def test_reference_defaults() -> None:
    rkd, pkt = RKD(), PKT()
    assert rkd.student_layers == rkd.teacher_layers == pkt.student_layers == ["embedding"]
    assert (rkd.weight, rkd.distance_weight, rkd.angle_weight, pkt.weight) == (1.0, 25.0, 50.0, 30000.0)
    assert (SP().weight, SP().student_layers, SP().teacher_layers) == (3000.0, ["last_stage"], ["last_stage"])
    assert (CC().weight, CC().dim, CC().student_layers, CC().teacher_layers) == (0.02, 128, ["embedding"], ["embedding"])


def test_forward_is_the_pure_function() -> None:
    rkd, pkt = RKD(), PKT()
    s, t = [torch.randn(6, 16)], [torch.randn(6, 64)]
    torch.testing.assert_close(rkd(s, t, {}), rkd_loss(s[0], t[0], 25.0, 50.0))
    torch.testing.assert_close(RKD(distance_weight=1, angle_weight=0)(s, t, {}), rkd_loss(s[0], t[0], 1.0, 0.0))
    torch.testing.assert_close(pkt(s, t, {}), pkt_loss(s[0], t[0]))
    maps_s, maps_t = [torch.randn(3, 8, 2, 2)], [torch.randn(3, 3, 4, 4)]
    torch.testing.assert_close(SP()(maps_s, maps_t, {}), sp_loss(maps_s[0], maps_t[0]))


def test_rkd_and_pkt_take_a_batch_scope_and_sum_layer_pairs() -> None:
    s, t = [torch.randn(5, 8), torch.randn(5, 3, 2)], [torch.randn(5, 4), torch.randn(5, 6)]
    for make, fn in ((RKD, rkd_loss), (PKT, pkt_loss)):
        with pytest.raises(ValueError, match="batch_scope"):
            make(batch_scope="world")
        # one process: the global batch is this batch; several layer pairs are summed
        torch.testing.assert_close(make(batch_scope="global")(s, t, {}), fn(s[0], t[0]) + fn(s[1], t[1]))


def test_cc_reads_one_layer() -> None:
    with pytest.raises(ValueError, match="one layer"):
        CC(student_layers=["embedding", "stage3"])


def test_cc_embeds_both_sides_with_trainable_linear_maps() -> None:
    cc = CC(dim=7)
    s, t = torch.randn(4, 16), torch.randn(4, 64)
    cc.build([s], [t])
    assert cc.embed_student.linear.weight.shape == (7, 16)
    assert cc.embed_teacher.linear.weight.shape == (7, 64)
    loss = cc([s], [t], {})
    torch.testing.assert_close(loss, cc_loss(cc.embed_student(s), cc.embed_teacher(t)))
    loss.backward()
    assert cc.embed_teacher.linear.weight.grad.abs().sum() > 0
    assert {id(p) for p in cc.main_parameters()} == {id(p) for p in cc.parameters()}


@pytest.mark.parametrize("make", [RKD, PKT, SP, CC], ids=["rkd", "pkt", "sp", "cc"])
def test_gradient_reaches_student_and_parts_not_teacher(make) -> None:
    module = small_module(make())
    distiller = module.distillers[0]
    terms = module.core.compute_losses(small_batch())
    assert set(terms.losses) == {"ce", distiller.name} and terms.weights[distiller.name] == distiller.weight
    terms.losses[distiller.name].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    assert all(p.grad is not None for p in distiller.main_parameters())


@pytest.mark.parametrize("make", [SP, CC], ids=["sp", "cc"])
def test_two_steps_give_finite_logged_losses_and_train_the_parts(make) -> None:
    assert_two_steps_train(make())


@pytest.mark.parametrize("cls", [RKD, PKT, SP, CC])
def test_a_batch_of_one_is_warned_about_once_and_counted(cls, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    module = small_module(cls())
    distiller = module.distillers[0]
    assert distiller.metrics() == {}
    with caplog.at_level("WARNING", logger="lightning_kd"):
        for _ in range(2):
            terms = module.core.compute_losses(small_batch(1))
    warnings = [r for r in caplog.records if "got a batch of one" in r.getMessage()]
    assert len(warnings) == 1 and distiller.name.upper() in warnings[0].getMessage().upper()
    assert distiller.batch_of_one == 2 and float(distiller.metrics()["batch_of_one"]) == 2.0
    assert torch.isfinite(terms.losses[distiller.name])
    module.core.compute_losses(small_batch(4))
    assert distiller.batch_of_one == 2  # a batch of four has relations
