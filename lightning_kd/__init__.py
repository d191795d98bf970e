"""lightning-kd: knowledge distillation for PyTorch Lightning.

The pieces: :class:`DistillationModule` (the LightningModule), :mod:`lightning_kd.distillers` (one object
per method), :mod:`lightning_kd.functional` (the pure losses), :mod:`lightning_kd.taps` (features by module
path), :mod:`lightning_kd.models` (the CIFAR zoo) and :mod:`lightning_kd.data` (data modules).
"""

from lightning_kd.module import DistillationModule

__version__ = "0.1.0"
__all__ = ["DistillationModule", "__version__"]
