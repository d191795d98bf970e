"""configs/loggers/wandb.yaml: a fit logs its loss components to an offline Weights & Biases run.

The run is offline (``WANDB_MODE=offline``) with every wandb folder in a temporary directory; the test
reads the run's ``.wandb`` file (a LevelDB-style log of protobuf records) and checks that the history holds
``train/loss``, ``train/ce`` and ``train/kd``. The wandb server address and the HTTP(S) proxies point to a
local socket that counts connections: an offline run must make none.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from lightning_kd.demo import digits_config_args

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "loggers" / "wandb.yaml"

_BLOCK = 32 * 1024  # LevelDB log block size used by the .wandb file
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Parse a ``.wandb`` transaction log into ``wandb_internal_pb2.Record`` messages.

    Layout: a 7-byte file header (``:W&B``, magic, version), then LevelDB log records in 32 KiB blocks:
    ``crc32 (4) | length (2, little endian) | type (1) | payload``; a payload split across blocks comes as
    FIRST, MIDDLE..., LAST pieces; a block tail shorter than a record header is zero padding.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log (header {data[:7]!r})"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        payload = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            pending, chunks = b"", [payload]
        elif kind == _FIRST:
            pending, chunks = payload, []
        elif kind == _MIDDLE:
            pending, chunks = pending + payload, []
        elif kind == _LAST:
            pending, chunks = b"", [pending + payload]
        else:  # zero padding up to the end of the block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        for chunk in chunks:
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
    return records


def _item_key(item) -> str:  # noqa: ANN001 - a protobuf HistoryItem / SummaryItem
    return item.key or "/".join(item.nested_key)


class _ConnectionCounter:
    """A local TCP socket that accepts and counts connections (stands in for the wandb server and proxies)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.close()


def test_config_sets_a_wandb_logger() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert logger["init_args"]["project"] == "lightning-kd"
    assert logger["init_args"]["save_dir"] == "outputs/wandb"
    assert "WANDB_MODE=offline" in CONFIG.read_text()


@pytest.fixture
def counter():
    server = _ConnectionCounter()
    yield server
    server.close()


def test_offline_fit_logs_the_loss_components(tmp_path: Path, counter: _ConnectionCounter) -> None:
    save_dir = tmp_path / "wandb_runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    local = f"http://127.0.0.1:{counter.port}"
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path / "wandb_dir"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
        WANDB_BASE_URL=local,
        HTTP_PROXY=local,
        HTTPS_PROXY=local,
        http_proxy=local,
        https_proxy=local,
        NO_PROXY="",
        no_proxy="",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        Path(env[name]).mkdir()
    command = [
        sys.executable, "-m", "lightning_kd.cli", "fit",
        *digits_config_args("kd"),
        "--config", str(CONFIG),
        "--model.teacher_checkpoint=null",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'root'}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    runs = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {save_dir / 'wandb'}, found {runs}"
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1, f"expected one .wandb file in {runs[0]}, found {logs}"
    records = read_wandb_records(logs[0])

    history: dict[str, list[float]] = {}
    for record in records:
        if record.HasField("history"):
            for item in record.history.item:
                history.setdefault(_item_key(item), []).append(json.loads(item.value_json))
    summary = {
        _item_key(item): json.loads(item.value_json)
        for record in records
        if record.HasField("summary")
        for item in record.summary.update
    }
    for key in ("train/loss", "train/ce", "train/kd"):
        assert key in history, f"{key} missing from the run's history keys {sorted(history)}"
        assert len(history[key]) == 3, (key, history[key])  # one row per step, log_every_n_steps=1
        assert all(isinstance(v, float) and v == v for v in history[key]), (key, history[key])
    # the logged total is the configured combination of the components: 0.1 * CE + 0.9 * KD
    for total, ce, kd in zip(history["train/loss"], history["train/ce"], history["train/kd"]):
        assert total == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-4)
    assert "val/acc1" in history or "val/acc1" in summary
    run_records = [record.run for record in records if record.HasField("run")]
    assert run_records and run_records[0].project == "lightning-kd", run_records[:1]

    # offline means offline: nothing connected to the (stand-in) server or proxies
    assert counter.connections == 0, f"{counter.connections} connection(s) were attempted in offline mode"
