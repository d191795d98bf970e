"""The CIFAR model zoo. Build by name with :func:`create_model`; tap points are in ``model.feature_paths``."""

from lightning_kd.models import resnet  # noqa: F401  (registers the models)
from lightning_kd.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
