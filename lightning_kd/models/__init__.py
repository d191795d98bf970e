"""The CIFAR model zoo. Build by name with :func:`create_model`; tap points are in ``model.feature_paths``, the
feature path's modules in ``model.feature_modules`` (:func:`feature_module_paths`)."""

# importing a family registers its models
from lightning_kd.models import (  # noqa: F401
    mobilenetv2,
    resnet,
    resnet50,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
from lightning_kd.models.registry import build_network, create_model, feature_module_paths, list_models, register_model

__all__ = ["build_network", "create_model", "feature_module_paths", "list_models", "register_model"]
