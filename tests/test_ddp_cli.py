"""Multi-process training through the ``lightning-kd`` command on CPU (gloo).

The command runs in a subprocess: Lightning's plain ``ddp`` launcher re-runs its own command line for the
other ranks, which inside pytest would re-run pytest. A small callback written into the test's folder (and
put on ``PYTHONPATH``) records what every rank held, so the checkpoint can be compared with each rank.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from lightning_kd.demo import digits_config_args

RECORDER = '''
import json
import os

import torch
from lightning.pytorch.callbacks import Callback


class Recorder(Callback):
    """Saves, per rank, the module's state (teacher left out) at the start and the end of the fit, the
    stage every training batch trained in, and the rank and world size."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath
        self.stages = []

    def _state(self, module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if not k.startswith("teacher.")}

    def on_train_start(self, trainer, module) -> None:
        torch.save(self._state(module), os.path.join(self.dirpath, f"start{trainer.global_rank}.pt"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stages.append([trainer.current_epoch, module.current_stage.name])

    def on_train_end(self, trainer, module) -> None:
        rank = trainer.global_rank
        torch.save(self._state(module), os.path.join(self.dirpath, f"rank{rank}.pt"))
        names = [name for name, _ in module.named_parameters() if not name.startswith("teacher.")]
        info = {"rank": rank, "world_size": trainer.world_size, "stages": self.stages, "parameters": names}
        with open(os.path.join(self.dirpath, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)
'''

TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "ddp_recorder.py").write_text(RECORDER)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    env["WANDB_DIR"] = str(tmp_path)
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def _args(config: str, tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "lightning_kd.cli", "fit", *digits_config_args(config),
        "--model.teacher_checkpoint=null", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=true", "--trainer.check_val_every_n_epoch=1",
        # every training image, whatever the digits runs use: a fit of a few steps stops inside an epoch, before
        # any validation forward (in which DDP would copy rank 0's BatchNorm statistics to the other ranks)
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.batch_size=16", "--data.train_subset=null",
        "--trainer.callbacks+=ddp_recorder.Recorder", f"--trainer.callbacks.dirpath={tmp_path}",
        *overrides,
    ]


def _run_all(commands: list[list[str]], envs: list[dict[str, str]]) -> list[tuple[int, str]]:
    """Start every command at once (each in its own process group); a hang kills them all and fails."""
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for cmd, env in zip(commands, envs)
    ]
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        outputs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"a process did not finish within {TIMEOUT} s (a hang); last output:\n"
                    + "\n----\n".join(o[-2000:] for o in outputs))
    return results


def _fit(config: str, tmp_path: Path, *overrides: str) -> None:
    [(code, out)] = _run_all([_args(config, tmp_path, "--trainer.devices=2", *overrides)], [_env(tmp_path)])
    assert code == 0, out[-4000:]


def _checkpoint(tmp_path: Path) -> dict[str, torch.Tensor]:
    found = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert len(found) == 1, f"expected one checkpoint, found {found}"
    checkpoint = torch.load(found[0], weights_only=True)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    return checkpoint


def _assert_ranks_agree(tmp_path: Path, checkpoint: dict) -> tuple[dict, dict]:
    """The checkpoint is rank 0's state; both ranks hold the same parameters; training moved them."""
    state = checkpoint["state_dict"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["rank"] for i in info] == [0, 1] and all(i["world_size"] == 2 for i in info)
    assert state.keys() == ranks[0].keys() and any(k.startswith("student.") for k in state)
    for key, value in state.items():
        assert torch.equal(value, ranks[0][key]), f"checkpoint tensor {key} is not what rank 0 held"
    for key in info[0]["parameters"]:  # DDP averages gradients: parameters never drift apart
        assert torch.equal(ranks[0][key], ranks[1][key]), f"parameter {key} differs between ranks"
    start = torch.load(tmp_path / "start0.pt", weights_only=True)
    assert not torch.equal(start["student.conv1.weight"], state["student.conv1.weight"]), "nothing trained"
    return ranks[0], ranks[1]


def test_feature_method_on_two_processes_checkpoints_rank_zero(tmp_path: Path) -> None:
    _fit("vid", tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=2")
    checkpoint = _checkpoint(tmp_path)
    assert checkpoint["global_step"] == 3
    rank0, rank1 = _assert_ranks_agree(tmp_path, checkpoint)
    assert any(k.startswith("distillers.0.") for k in checkpoint["state_dict"])  # VID's regressors
    # BatchNorm statistics are per rank (DDP broadcasts rank 0's at each forward): rank 1 ends on its own
    assert not torch.equal(rank0["student.bn1.running_mean"], rank1["student.bn1.running_mean"])


def test_staged_method_on_two_processes_switches_stage(tmp_path: Path) -> None:
    # AB trains only in its initialisation stage, so the main stage leaves its connectors idle: under DDP
    # the module touches idle parameters with a zero weight instead of needing find_unused_parameters
    _fit("ab", tmp_path, "--model.distillers.init_args.stage_epochs=1", "--trainer.max_epochs=2",
         "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1")
    checkpoint = _checkpoint(tmp_path)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 6
    assert checkpoint["lightning_kd"]["stage"] == "main"
    _assert_ranks_agree(tmp_path, checkpoint)
    for r in range(2):
        stages = json.loads((tmp_path / f"rank{r}.json").read_text())["stages"]
        assert stages == [[0, "ab_init"]] * 3 + [[1, "main"]] * 3


@pytest.mark.slow  # rank agreement is the VID test's; identical banks (without DDP's buffer broadcast) test_crd's
def test_crd_on_two_processes(tmp_path: Path) -> None:
    _fit("crd", tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=1")
    checkpoint = _checkpoint(tmp_path)
    rank0, rank1 = _assert_ranks_agree(tmp_path, checkpoint)
    banks = [k for k in checkpoint["state_dict"] if k.startswith("distillers.0.") and "memory" in k]
    assert banks, f"no memory bank in the checkpoint: {sorted(checkpoint['state_dict'])}"
    for key in banks:  # every rank writes the whole global batch into its banks: they stay identical
        assert torch.equal(rank0[key], rank1[key]), f"CRD buffer {key} differs between ranks"


def test_two_nodes_of_one_process_each(tmp_path: Path) -> None:
    port = str(free_port())
    command = _args("at", tmp_path, "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.max_steps=3",
                    "--trainer.limit_val_batches=1")
    envs = [_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(n)) for n in range(2)]
    results = _run_all([command, command], envs)
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node} failed:\n{out[-4000:]}"
    _assert_ranks_agree(tmp_path, _checkpoint(tmp_path))


@pytest.mark.slow  # two two-process fits: about a minute on 2 cores
def test_a_resumed_fit_crosses_the_stage_boundary_on_two_processes(tmp_path: Path) -> None:
    # the first fit ends with AB's initialisation stage; the resumed one must start in the main stage, on both ranks
    common = ("--model.distillers.init_args.stage_epochs=1", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=1", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.save_last=true", f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}")  # fmt: skip
    _fit("ab", tmp_path, *common, "--trainer.max_epochs=1")
    last = tmp_path / "ckpt" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["lightning_kd"]["stage"] == "ab_init" and first["global_step"] == 3
    _fit("ab", tmp_path, *common, "--trainer.max_epochs=2", f"--ckpt_path={last}")
    resumed = torch.load(last, weights_only=True)
    assert resumed["lightning_kd"]["stage"] == "main" and resumed["global_step"] == 6
    for r in range(2):
        stages = json.loads((tmp_path / f"rank{r}.json").read_text())["stages"]
        assert stages == [[1, "main"]] * 3
