"""The ``lightning-kd`` command.

    lightning-kd fit --config configs/digits/base.yaml --config configs/methods/kd.yaml
    lightning-kd validate|test|predict --config ... --ckpt_path=RUN.ckpt     # or an exported student.pt
    lightning-kd fit --config ... --model.class_path=my_pkg.MyModule          # a subclass of DistillationModule
    lightning-kd export RUN.ckpt --output student.pt [--format exported]
    lightning-kd layers resnet32x4 --input-size 3 32 32                        # every module path and its shape
    lightning-kd report outputs/ --output outputs/report                        # a results table from run folders
    lightning-kd cache --config configs/digits/base.yaml --output outputs/digits/teacher-cache   # teacher outputs

``fit``/``validate``/``test``/``predict`` are LightningCLI over :class:`DistillationModule` (or a subclass) and the
data modules: every option of a config can be overridden on the command line, ``lightning-kd fit --help`` lists
them. The other commands are :mod:`lightning_kd.commands` (``export``, ``layers``), :mod:`lightning_kd.report` and
:mod:`lightning_kd.cache.command`.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lightning_kd.callbacks import PredictionWriter, progress_bar, run_dir
from lightning_kd.checkpoints import CheckpointError, checkpoint_kind, check_resume_checkpoint, load_into
from lightning_kd.finite import StageDivergedError
from lightning_kd.module import DistillationModule, TeacherMismatchError
from lightning_kd.records import RunRecord
from lightning_kd.taps import TapError

log = logging.getLogger(__name__)

#: commands that are not LightningCLI subcommands: name -> "module:function"
COMMANDS = {
    "cache": "lightning_kd.cache.command:main",
    "export": "lightning_kd.commands:export_main",
    "layers": "lightning_kd.commands:layers_main",
    "report": "lightning_kd.report:main",
}
#: the library's own errors: reported in one line, without a traceback
USER_ERRORS = (CheckpointError, TapError, TeacherMismatchError, StageDivergedError)


class RunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own log folder (:func:`run_dir`: the version
    folder of a CSV or TensorBoard logger, ``<save_dir>/<project>/<run id>`` of others, so no run overwrites
    another's) and sends it to every configured logger as hyperparameters."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)  # fmt: skip
            config = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": _plain(config)})
        self.already_saved = trainer.strategy.broadcast(True)


def _plain(value: Any) -> Any:
    """The config as plain data (paths and namespaces as strings/dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class DistillationCLI(LightningCLI):
    """LightningCLI with the library's defaults: the digits data, ``DistillationModule`` (any subclass through
    ``--model.class_path``), the progress that suits the output, a run record and the config saved per run."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.set_defaults(
            {
                "data": {"class_path": "lightning_kd.data.DigitsDataModule"},
                "model": {"class_path": "lightning_kd.DistillationModule"},
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if getattr(self, "held_ckpt_path", None):  # see parse_arguments
            config["ckpt_path"] = self.held_ckpt_path
        trainer = config.get("trainer", {})
        callbacks = trainer.get("callbacks") or []
        names = [str(getattr(c, "class_path", c)) for c in callbacks]
        defaults = []
        if trainer.get("enable_progress_bar") is not False and not any("ProgressBar" in n for n in names):
            defaults.append(progress_bar())
        if not any(n.endswith("RunRecord") for n in names):
            defaults.append(RunRecord())
        if self.subcommand == "predict" and not any("PredictionWriter" in n for n in names):
            defaults.append(PredictionWriter())
        self.trainer_defaults["callbacks"] = defaults
        # Lightning unpickles a resumed checkpoint fully for URLs (and torch's weights-only default can be
        # switched off by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD): ask for weights-only loading unless told otherwise
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
        """Parse, then hold ``--ckpt_path`` back until the classes are instantiated: LightningCLI would otherwise
        replace the configured model's arguments by the hyperparameters saved in that checkpoint. Here the command
        line decides: otherwise a teacher run's checkpoint would silently turn a distillation into more epochs of
        the teacher's own fit, a checkpoint of another run would switch the networks, and overrides such as
        ``--model.allow_teacher_change`` would be dropped. The checkpoint is checked against the configured model
        instead (see ``check_resume_checkpoint``)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        arguments = self.config[subcommand] if subcommand else None
        self.held_ckpt_path = arguments.get("ckpt_path") if arguments is not None else None
        if self.held_ckpt_path:
            arguments["ckpt_path"] = None

    # --- --ckpt_path: checked before Lightning reads it; an exported student is loaded into the student -------
    def _prepare_checkpoint(self) -> None:
        arguments = self.config_init[self.subcommand]
        path = arguments.get("ckpt_path")
        if not path or "://" in str(path) or str(path) in ("last", "best", "hpc", "registry"):
            return
        if checkpoint_kind(path) == "state_dict":
            if self.subcommand == "fit":
                raise CheckpointError(
                    f"--ckpt_path {path} is a plain state dict (an exported network), not a training checkpoint: "
                    "a fit resumes from a checkpoint written by a fit; to start from these weights pass "
                    "--model.student_checkpoint=PATH"
                )
            load_into(self.model.student, path, what="student")
            log.info("Loaded the exported student %s into the student.", path)
            arguments["ckpt_path"] = None
            return
        check_resume_checkpoint(path, self.model)

    def before_fit(self) -> None:
        self._prepare_checkpoint()
        cache = getattr(getattr(self.model, "core", None), "teacher_cache", None)
        if cache is not None:  # refuse other data or augmentation before the run's folder is written
            cache.check_data(self.datamodule)

    def before_validate(self) -> None:
        self._prepare_checkpoint()

    def before_test(self) -> None:
        self._prepare_checkpoint()

    def before_predict(self) -> None:
        self._prepare_checkpoint()


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


def run_cli(args: list[str] | None = None, run: bool = True) -> DistillationCLI:
    """Build (and by default run) the LightningCLI on ``args``; returns it, so callers can read its trainer and
    model."""
    quiet_lightning_notices()
    return DistillationCLI(
        DistillationModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            module_name, _, function = COMMANDS[argv[0]].partition(":")
            getattr(importlib.import_module(module_name), function)(argv[1:])
            return
        run_cli(args)  # None: LightningCLI reads sys.argv itself
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        print(f"lightning-kd: error: {user_error}", file=sys.stderr)  # noqa: T201 - the command's own error line
        raise SystemExit(1) from None


def _user_error(error: BaseException | None) -> BaseException | None:
    """The library's own error (:data:`USER_ERRORS`) that ``error`` is or was raised from: jsonargparse wraps an
    error raised while it builds the model (a tap the network does not have, an unreadable teacher_checkpoint) in
    a ValueError that lists the whole config."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, USER_ERRORS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":  # pragma: no cover
    main()
