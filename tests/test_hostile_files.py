"""Resuming from a checkpoint file that is hostile or broken: refused with an error, and a pickle payload
never runs.

Lightning reads ``ckpt_path`` itself (before any hook of the module), so the module cannot choose how the
file is unpickled; what protects a resume is:

- a local file: ``torch.load``'s own default (``weights_only=True`` since torch 2.6; Lightning passes
  ``weights_only=None`` through), which the environment variable ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
  turns off, unless the caller passes ``weights_only=True`` explicitly;
- a URL: nothing by default, since Lightning turns ``None`` into ``weights_only=False`` for remote files;
  the caller must pass ``weights_only=True``;
- the command line: ``LightningCLI`` first reads a local ``--ckpt_path`` with ``weights_only=True`` (for
  its hyper-parameters), whatever the environment says.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import ROOT, make_trainer
from lightning_kd import DistillationModule
from lightning_kd.data import DigitsDataModule
from lightning_kd.demo import digits_config_args

REFUSED = "Weights only load failed"


class _Payload:
    """Unpickling this object runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _module() -> DistillationModule:
    # the network of configs/digits/student.yaml, so the command line can resume from the same files
    return DistillationModule("resnet8", num_classes=10, input_size=(3, 16, 16))


def _data() -> DigitsDataModule:
    return DigitsDataModule(size=16, batch_size=16)


def _trainer(**kw) -> L.Trainer:
    return make_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A genuine checkpoint after one step, the same with a pickle payload inside, and a truncated copy."""
    folder = tmp_path_factory.mktemp("checkpoints")
    L.seed_everything(0)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(_module(), _data())
    good = folder / "good.ckpt"
    trainer.save_checkpoint(good)
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["lightning_kd"]["note"] = _Payload(folder / "payload-ran")
    hostile = folder / "hostile.ckpt"
    torch.save(checkpoint, hostile)
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = folder / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    return {"good": good, "hostile": hostile, "truncated": truncated, "garbage": garbage,
            "marker": folder / "payload-ran"}


@pytest.fixture
def no_marker(files: dict[str, Path]) -> Iterator[Path]:
    marker = files["marker"]
    marker.unlink(missing_ok=True)
    yield marker
    assert not marker.exists(), "the pickle payload ran"


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[str]:
    """The checkpoint folder over HTTP on localhost (to resume from a URL)."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(files["good"].parent)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


# ------------------------------------------------------------------------------------------------------------
# the Python API: trainer.fit(module, data, ckpt_path=...)
# ------------------------------------------------------------------------------------------------------------
class _Watch(Callback):
    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.batches = 0

    def on_train_start(self, trainer, module) -> None:
        self.start = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches += 1


def test_a_genuine_checkpoint_resumes(files: dict[str, Path]) -> None:
    watch = _Watch()
    trainer = _trainer(callbacks=[watch])
    trainer.fit(_module(), _data(), ckpt_path=files["good"], weights_only=True)
    assert watch.batches == 1 and trainer.global_step == 2  # one step restored, one more trained
    saved = torch.load(files["good"], weights_only=True)["state_dict"]
    assert saved.keys() == watch.start.keys()
    assert all(torch.equal(saved[k], watch.start[k]) for k in saved), "the fit did not start from the file"


def test_a_pickle_payload_is_refused(files: dict[str, Path], no_marker: Path) -> None:
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer()
    with pytest.raises(pickle.UnpicklingError, match=REFUSED):
        trainer.fit(module, _data(), ckpt_path=files["hostile"])
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_explicit_weights_only_refuses_even_when_the_environment_allows_unpickling(
    files: dict[str, Path], no_marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match=REFUSED):
        _trainer().fit(_module(), _data(), ckpt_path=files["hostile"], weights_only=True)


def test_a_pickle_payload_from_a_url_is_refused_with_weights_only(
    files: dict[str, Path], server: str, no_marker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # where torch.hub keeps downloads
    with pytest.raises(pickle.UnpicklingError, match=REFUSED):
        _trainer().fit(_module(), _data(), ckpt_path=f"{server}/hostile.ckpt", weights_only=True)


def test_broken_checkpoints_are_clear_errors(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="corrupted"):
        _trainer().fit(_module(), _data(), ckpt_path=files["truncated"])
    # not a zip archive: torch reads it as a legacy pickle, and the error depends on the bytes (an
    # UnpicklingError, or an IndexError from the weights-only unpickler); refused all the same
    trainer = _trainer()
    with pytest.raises((pickle.UnpicklingError, IndexError, RuntimeError, EOFError)):
        trainer.fit(_module(), _data(), ckpt_path=files["garbage"])
    assert trainer.global_step == 0
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        _trainer().fit(_module(), _data(), ckpt_path=tmp_path / "nowhere.ckpt")


# ------------------------------------------------------------------------------------------------------------
# the command line: lightning-kd fit --ckpt_path ...
# ------------------------------------------------------------------------------------------------------------
def _cli(ckpt_path: str, tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               WANDB_DIR=str(tmp_path), TORCH_HOME=str(tmp_path / "torch"), PYTHONWARNINGS="ignore", **env_extra)
    command = [
        sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args("student"),
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={ckpt_path}",
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_pickle_payload(files: dict[str, Path], no_marker: Path, tmp_path: Path) -> None:
    # even with torch told to unpickle whenever weights_only is left unset
    result = _cli(str(files["hostile"]), tmp_path, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    assert result.returncode != 0 and REFUSED in result.stderr, result.stderr[-3000:]


@pytest.mark.slow  # torch's own "corrupted" error, the Python API's test above, through a subprocess
def test_cli_truncated_checkpoint_is_a_clear_error(files: dict[str, Path], tmp_path: Path) -> None:
    result = _cli(str(files["truncated"]), tmp_path)
    assert result.returncode != 0 and "corrupted" in result.stderr, result.stderr[-3000:]


def test_cli_refuses_a_pickle_payload_from_a_url(
    files: dict[str, Path], server: str, no_marker: Path, tmp_path: Path
) -> None:
    marker = no_marker
    result = _cli(f"{server}/hostile.ckpt", tmp_path)
    ran = marker.exists()
    marker.unlink(missing_ok=True)  # reported here, not by the fixture
    assert not ran, "the pickle payload ran"
    assert result.returncode != 0 and REFUSED in result.stderr, result.stderr[-3000:]
