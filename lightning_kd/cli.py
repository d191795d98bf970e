"""The ``lightning-kd`` command: LightningCLI over :class:`DistillationModule` and the data modules.

    lightning-kd fit --config configs/digits/kd.yaml
    lightning-kd fit --config configs/cifar100/pairs/resnet32x4-resnet8x4.yaml --config configs/methods/kd.yaml
    lightning-kd validate --config configs/digits/kd.yaml --ckpt_path path/to/last.ckpt

Every option of the configs can be overridden on the command line (``--trainer.max_epochs=5``,
``--model.task_loss_weight=0.1``, ``--data.batch_size=128``); ``lightning-kd fit --help`` lists them.
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_kd.callbacks import DistillationProgressBar
from lightning_kd.module import DistillationModule


class DistillationCLI(LightningCLI):
    """LightningCLI with the library's defaults: the digits data, and a config saved beside the logs."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.set_defaults({"data": {"class_path": "lightning_kd.data.DigitsDataModule"}})

    def before_instantiate_classes(self) -> None:
        """Add the library's progress bar unless progress bars are off or the config brings its own."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer", {})
        callbacks = trainer.get("callbacks") or []
        own_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if trainer.get("enable_progress_bar") is not False and not own_bar:
            self.trainer_defaults["callbacks"] = [DistillationProgressBar()]
        # Lightning unpickles a resumed checkpoint fully for URLs (and torch's weights-only default can be
        # switched off by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): ask for weights-only loading unless told otherwise
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True


class _DropAdvertisement(logging.Filter):
    """Lightning's start-up tips recommending its cloud services (litlogger, litmodels): noise for a run that
    stays offline."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


def quiet_lightning_notices() -> None:
    """Leave out start-up messages a user cannot act on: Lightning's cloud-service tips, and the deprecation
    of ``torch.utils._pytree.LeafSpec`` that Lightning's own code triggers with this torch."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisement())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script."""
    run_cli(args)


def run_cli(args: list[str] | None = None, run: bool = True) -> DistillationCLI:
    """Build (and by default run) the CLI on ``args``; returns it, so callers can read its trainer and model."""
    quiet_lightning_notices()
    return DistillationCLI(
        DistillationModule,
        L.LightningDataModule,
        subclass_mode_model=False,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

