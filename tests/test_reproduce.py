"""python -m lightning_kd.reproduce: the runs of a benchmark, each in its own folder; listed, local, SLURM array."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from lightning_kd import reproduce
from lightning_kd.records import write_record

CIFAR = ROOT / "configs" / "cifar100"
TEACHERS = ["wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50"]
PAIRS = [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
]  # fmt: skip
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
        "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]  # fmt: skip


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    """A copy of the CIFAR-100 configs with three stand-in method files and one per-pair override."""
    root = tmp_path / "configs"
    for source in CIFAR.glob("*/*.yaml"):
        if source.parent.name in ("pairs", "teachers"):
            target = root / "cifar100" / source.relative_to(CIFAR)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
    (root / "cifar100" / "student.yaml").write_text((CIFAR / "student.yaml").read_text())
    (root / "methods").mkdir()
    for method in ("crd", "kd", "fsp"):
        (root / "methods" / f"{method}.yaml").write_text("model: {}\n")
    override = root / "cifar100" / "overrides" / "kd" / "vgg13-vgg8.yaml"
    override.parent.mkdir(parents=True)
    override.write_text("model: {task_loss_weight: 0.5}\n")
    return root


def _value(args: list[str], option: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{option}=")]
    return value


def _configs(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--config"]


# ------------------------------------------------------------------------------------------------------------
# the list of runs
# ------------------------------------------------------------------------------------------------------------
def test_the_runs_of_the_cifar100_table(configs: Path) -> None:
    runs = reproduce.build_runs(configs, seeds=[0, 1], outputs="out", extra=["--trainer.max_epochs=3"])
    teachers = [r for r in runs if r.section == "teachers"]
    students = [r for r in runs if r.section == "students"]
    cells = [r for r in runs if r.section == "cells"]
    assert runs == teachers + students + cells  # teachers first
    assert [(r.pair, r.seed) for r in teachers] == [(t, s) for t in TEACHERS for s in (0, 1)]
    assert sorted({r.pair for r in students}) == sorted({s for _, s in PAIRS}) and len(students) == 2 * 9
    fsp_na = reproduce.NOT_APPLICABLE["fsp"]
    assert len(fsp_na) == 7
    expected = [(f"{t}-{s}", m, seed) for t, s in PAIRS for m in ("kd", "fsp", "crd") for seed in (0, 1)
                if not (m == "fsp" and f"{t}-{s}" in fsp_na)]  # fmt: skip
    assert [(r.pair, r.method, r.seed) for r in cells] == expected  # table order, methods in the table's order
    assert len(reproduce.build_runs(configs, include_na=True, only=["cells"], seeds=[0])) == 13 * 3

    for run in runs:
        args = run.args()
        folder = f"out/cifar100/{run.pair}/{run.method}/seed{run.seed}"
        assert run.folder == folder and all(Path(p).is_file() for p in _configs(args))
        assert _value(args, "--trainer.default_root_dir") == folder == _value(args, "--trainer.logger.save_dir")
        assert _value(args, "--trainer.logger") == "lightning.pytorch.loggers.CSVLogger"
        assert _value(args, "--trainer.logger.name") == "" == _value(args, "--trainer.logger.version")
        assert _value(args, "--seed_everything") == str(run.seed)
        assert _value(args, "--trainer.callbacks+") == "lightning_kd.records.RunRecord"
        labels = [_value(args, f"--trainer.callbacks.{k}") for k in ("benchmark", "pair", "method")]
        assert labels == ["cifar100", run.pair, run.method]
        assert args[-1] == "--trainer.max_epochs=3"  # extras come last
    teacher = next(r for r in teachers if (r.pair, r.seed) == ("resnet32x4", 1))
    assert _configs(teacher.args()) == [f"{configs}/cifar100/teachers/resnet32x4.yaml"]
    assert _value(teacher.args(), "--trainer.callbacks.init_args.dirpath") == teacher.folder
    assert teacher.checkpoint == f"{teacher.folder}/resnet32x4.ckpt"
    student = next(r for r in students if (r.pair, r.seed) == ("MobileNetV2", 0))
    assert _value(student.args(), "--model.student") == "MobileNetV2"
    assert _value(student.args(), "--model.optimizer.init_args.lr") == "0.01"
    cell = next(r for r in cells if (r.pair, r.method, r.seed) == ("vgg13-vgg8", "kd", 1))
    assert _configs(cell.args()) == [f"{configs}/cifar100/pairs/vgg13-vgg8.yaml", f"{configs}/methods/kd.yaml",
                                     f"{configs}/cifar100/overrides/kd/vgg13-vgg8.yaml"]  # fmt: skip
    # every seed distils from the first seed's teacher
    assert _value(cell.args(), "--model.teacher_checkpoint") == "out/cifar100/vgg13/teacher/seed0/vgg13.ckpt"
    crd = next(r for r in cells if (r.pair, r.method) == ("vgg13-vgg8", "crd"))
    assert len(_configs(crd.args())) == 2  # no override file for this one
    assert cell.shell().startswith(f"lightning-kd fit --config {configs}/cifar100/pairs/vgg13-vgg8.yaml ")
    assert cell.argv("py")[:4] == ["py", "-m", "lightning_kd.cli", "fit"]


def test_filters_and_errors(configs: Path, capsys: pytest.CaptureFixture) -> None:
    runs = reproduce.build_runs(configs, pairs=["resnet32x4-resnet8x4", "vgg13-vgg8"], methods=["KD"], seeds=[4],
                                teacher_seeds=[7, 8], teacher_seed=8)  # fmt: skip
    assert [r.label for r in runs] == [
        "resnet32x4 teacher seed7", "resnet32x4 teacher seed8", "vgg13 teacher seed7", "vgg13 teacher seed8",
        "resnet8x4 student seed4", "vgg8 student seed4", "resnet32x4-resnet8x4 kd seed4", "vgg13-vgg8 kd seed4",
    ]  # fmt: skip
    assert runs[-1].needs == ("outputs/cifar100/vgg13/teacher/seed8/vgg13.ckpt",)
    only_teacher = ["--only", "teachers", "--pair", "ResNet50-vgg8", "--seed", "2"]
    assert reproduce.main(["--configs", str(configs), *only_teacher]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# teachers" and len(out) == 2
    assert out[1].startswith(f"lightning-kd fit --config {configs}/cifar100/teachers/ResNet50.yaml ")
    assert out[1].endswith(" --seed_everything=2")
    with pytest.raises(ValueError, match="did you mean resnet32x4-resnet8x4"):
        reproduce.build_runs(configs, pairs=["resnet32x4-resnet8"])
    with pytest.raises(SystemExit):
        reproduce.main(["--configs", str(configs), "--method", "nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--configs", str(configs), "--seeds", "0,x"])
    assert "seeds must be integers" in capsys.readouterr().err
    assert reproduce.main(["--configs", str(configs), "--only", "students", "--pair", "vgg13-vgg8", "--seeds", "0",
                           "--extra", "--trainer.max_epochs=1", "--data.init_args.batch_size=8"]) == 0  # fmt: skip
    (line,) = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert line.endswith("--seed_everything=0 --trainer.max_epochs=1 --data.init_args.batch_size=8")


def test_the_digits_runs(tmp_path: Path) -> None:
    runs = reproduce.build_runs(ROOT / "configs", "digits", seeds=[0], outputs=tmp_path)
    teacher, student, *cells = runs
    digits = ROOT / "configs" / "digits"
    assert (teacher.pair, teacher.method) == ("resnet56", "teacher")
    assert _configs(teacher.args()) == [f"{digits}/teacher.yaml"]
    assert teacher.checkpoint == f"{tmp_path}/digits/resnet56/teacher/seed0/teacher.ckpt"
    assert (student.pair, student.method) == ("resnet8", "student")
    assert _configs(student.args()) == [f"{digits}/base.yaml", f"{digits}/student.yaml"]
    methods = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    assert sorted(c.method for c in cells) == methods and {c.pair for c in cells} == {"resnet56-resnet8"}
    for cell in cells:
        override = digits / "overrides" / f"{cell.method}.yaml"
        expected = [f"{digits}/base.yaml", f"{ROOT}/configs/methods/{cell.method}.yaml"]
        assert _configs(cell.args()) == expected + ([str(override)] if override.is_file() else [])
        assert cell.needs == (teacher.checkpoint,)


# ------------------------------------------------------------------------------------------------------------
# what is left: records, checkpoints, resumes
# ------------------------------------------------------------------------------------------------------------
def _record(run: reproduce.Run, status: str) -> None:
    write_record(Path(run.folder) / "run.json", {"status": status, "labels": {}})


def test_done_runs_are_left_out(configs: Path, tmp_path: Path) -> None:
    runs = reproduce.build_runs(configs, pairs=["vgg13-vgg8"], methods=["kd", "crd"], seeds=[0, 1],
                                outputs=tmp_path / "out")  # fmt: skip
    by_label = {r.label: r for r in runs}
    _record(by_label["vgg13-vgg8 kd seed0"], "finished")
    _record(by_label["vgg13-vgg8 kd seed1"], "running")
    failed = by_label["vgg13-vgg8 crd seed0"]
    _record(failed, "failed")
    Path(failed.resume_from).parent.mkdir(parents=True)
    Path(failed.resume_from).write_bytes(b"checkpoint")
    _record(by_label["vgg13-vgg8 crd seed1"], "interrupted")  # no checkpoint: starts again from scratch
    weights = Path(by_label["vgg13 teacher seed0"].checkpoint)  # teacher weights put there by hand
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    assert by_label["vgg13 teacher seed0"].state() == "checkpoint"
    Path(by_label["vgg8 student seed1"].folder).mkdir(parents=True)
    (Path(by_label["vgg8 student seed1"].folder) / "run.json").write_text("{broken")
    assert by_label["vgg8 student seed1"].state() == "unreadable"

    todo = [r.label for r in reproduce.pending(runs)]
    assert todo == ["vgg13 teacher seed1", "vgg8 student seed0", "vgg8 student seed1", "vgg13-vgg8 crd seed0",
                    "vgg13-vgg8 crd seed1"]  # fmt: skip
    assert "vgg13-vgg8 kd seed1" in [r.label for r in reproduce.pending(runs, include_running=True)]
    assert failed.resumable() and not by_label["vgg13-vgg8 crd seed1"].resumable()
    assert failed.args(resume=True)[-1] == f"--ckpt_path={failed.resume_from}"
    assert "--ckpt_path" not in " ".join(failed.args())


def test_local_runs_skip_done_ones_and_stop_at_a_failure(configs: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    runs = reproduce.build_runs(configs, pairs=["vgg13-vgg8"], methods=["kd"], seeds=[0], outputs=tmp_path)
    _record(runs[1], "finished")  # the student alone
    calls: list[list[str]] = []

    class Done:
        def __init__(self, code: int) -> None:
            self.returncode = code

    def fake_run(argv: list[str], check: bool) -> Done:
        calls.append(argv)
        return Done(1 if len(calls) == 1 else 0)

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    assert reproduce.run_local(runs, python="py") == 1
    assert calls == [runs[0].argv("py")]  # stopped at the failed teacher
    calls.clear()
    assert reproduce.run_local(runs, keep_going=True, python="py") == 1
    assert calls == [runs[0].argv("py"), runs[2].argv("py")]  # the finished student is left out


# ------------------------------------------------------------------------------------------------------------
# the SLURM array
# ------------------------------------------------------------------------------------------------------------
def test_the_slurm_array(configs: Path, tmp_path: Path) -> None:
    runs = reproduce.build_runs(configs, pairs=["vgg13-vgg8", "resnet56-resnet20"], methods=["kd"], seeds=[0, 1],
                                outputs=tmp_path / "out")  # fmt: skip
    _record(next(r for r in runs if r.label == "vgg13-vgg8 kd seed1"), "finished")
    options = reproduce.SlurmOptions(gpus=1, cpus=6, time="2-00:00:00", partition="gpu", account="lab",
                                     max_parallel=20, sbatch=("--qos=high",), setup=("module load cuda",),
                                     python="/env/bin/python")  # fmt: skip
    written = reproduce.write_slurm(runs, tmp_path / "slurm", options, workdir=tmp_path)
    script = written.script.read_text()
    assert subprocess.run(["bash", "-n", str(written.script)], capture_output=True).returncode == 0

    # one task per run left, teachers the cells need first; each line is the run's own command
    todo = reproduce.pending(runs)
    assert len(todo) == len(runs) - 1 and len(written.lines) == len(todo)
    assert [r.label for r in written.runs[:2]] == ["resnet56 teacher seed0", "vgg13 teacher seed0"]
    assert sorted(r.label for r in written.runs) == sorted(r.label for r in todo)
    assert written.tasks.read_text().splitlines() == written.lines
    for line, run in zip(written.lines, written.runs, strict=True):
        assert shlex.split(line) == run.argv("/env/bin/python")
    assert "vgg13-vgg8 kd seed1" not in [r.label for r in written.runs]
    for expected in ("#SBATCH --array=0-10%20", "#SBATCH --cpus-per-task=6", "#SBATCH --time=2-00:00:00",
                     "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                     "#SBATCH --qos=high", f"#SBATCH --output={tmp_path}/slurm/%A_%a.out", "module load cuda",
                     f"cd {tmp_path}"):  # fmt: skip
        assert expected in script.splitlines()
    # the cells wait for the teachers they read
    assert written.commands == [
        f"jid=$(sbatch --parsable --array=0-1%20 {written.script})",
        f"sbatch --dependency=afterok:${{jid%%;*}} --array=2-10%20 {written.script}",
    ]
    # once the teachers are done, one submission of what is left
    for run in written.runs[:2]:
        _record(run, "finished")
    again = reproduce.write_slurm(runs, tmp_path / "slurm", options, workdir=tmp_path)
    assert len(again.lines) == 9 and again.commands == [f"sbatch {again.script}"]
    assert again.script != written.script  # a new list never replaces one a pending array reads
    assert "#SBATCH --array=0-8%20" in again.script.read_text()
    # several GPUs per run: one process per GPU and the trainer told so
    wide = reproduce.write_slurm(runs, tmp_path / "wide", reproduce.SlurmOptions(gpus=4, python="py"))
    assert "#SBATCH --ntasks-per-node=4" in wide.script.read_text().splitlines()
    assert all(line.endswith(" --trainer.devices=4") for line in wide.lines)
    for run in runs:
        _record(run, "finished")
    assert reproduce.write_slurm(runs, tmp_path / "slurm", options) is None


def test_main_writes_the_array_and_prints_sbatch(configs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = ["--configs", str(configs), "--pair", "vgg13-vgg8", "--method", "kd", "--seeds", "0", "--slurm",
            "--only", "students", "--only", "cells", "--partition", "a100"]  # fmt: skip
    assert reproduce.main(args) == 0
    captured = capsys.readouterr()
    (script,) = (tmp_path / "outputs" / "cifar100" / "slurm").glob("array-*.sh")
    assert f"sbatch {script}" in captured.out.splitlines() and "2 of 2 runs to do" in captured.out
    assert "these teacher weights neither exist" in captured.err  # --only cells without the teachers trained
    assert "#SBATCH --partition=a100" in script.read_text()


# ------------------------------------------------------------------------------------------------------------
# two tasks of a digits array, to completion, then the report
# ------------------------------------------------------------------------------------------------------------
FAKE_SRUN = """#!/bin/bash
# stands in for srun: records the command it was given (one argument per line) instead of starting it
printf '%s\\n' "$@" > "$SRUN_RECORD"
"""


def _digits_array(tmp_path: Path) -> tuple[list[reproduce.Run], reproduce.SlurmArray]:
    runs = reproduce.build_runs(ROOT / "configs", "digits", methods=["kd"], only=["teachers", "cells"], seeds=[0],
                                extra=TINY)  # fmt: skip
    written = reproduce.write_slurm(runs, tmp_path / "outputs" / "digits" / "slurm", workdir=tmp_path)
    assert [r.label for r in written.runs] == ["resnet56 teacher seed0", "resnet56-resnet8 kd seed0"]
    assert subprocess.run(["bash", "-n", str(written.script)]).returncode == 0
    return runs, written


def test_two_digits_tasks_in_a_fake_slurm_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The script picks its task's line and hands it to srun intact; the command then runs here, in this process
    (as srun would start it), to completion; the report tabulates both runs."""
    from lightning_kd import report
    from lightning_kd.cli import run_cli

    monkeypatch.chdir(tmp_path)
    runs, written = _digits_array(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    for task, run in enumerate(written.runs):
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_ID=str(task),
                   SRUN_RECORD=str(tmp_path / f"srun-{task}.txt"))  # fmt: skip
        result = subprocess.run(["bash", str(written.script)], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        command = (tmp_path / f"srun-{task}.txt").read_text().splitlines()
        assert command == run.argv() and command[1:3] == ["-m", "lightning_kd.cli"]
        run_cli(command[3:])
    assert [r.state() for r in runs] == ["finished", "finished"]
    assert Path(runs[0].checkpoint).is_file()  # the teacher's weights, where the cell read them
    # a task index past the list is an error, not a silent success
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="2",
               SRUN_RECORD=str(tmp_path / "srun-x.txt"))  # fmt: skip
    assert subprocess.run(["bash", str(written.script)], env=env, capture_output=True).returncode == 2
    assert reproduce.write_slurm(runs, tmp_path / "outputs" / "digits" / "slurm") is None  # nothing left

    built = report.build_report([tmp_path / "outputs" / "digits"])
    assert [(r.pair, r.method, r.seeds) for r in built.rows] == [("resnet56-resnet8", "teacher", [0]),
                                                                 ("resnet56-resnet8", "kd", [0])]  # fmt: skip
    assert not built.unfinished


@pytest.mark.slow
def test_two_digits_tasks_through_srun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same two tasks, each started by the script in its own process (srun passes the command through)."""
    monkeypatch.chdir(tmp_path)
    runs, written = _digits_array(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    python_path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    for task in range(2):
        env = dict(os.environ, PATH=path, PYTHONPATH=python_path, SLURM_ARRAY_TASK_ID=str(task))
        for name in [n for n in env if n.startswith("SLURM_") and n != "SLURM_ARRAY_TASK_ID"]:
            del env[name]
        result = subprocess.run(["bash", str(written.script)], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r.state() for r in runs] == ["finished", "finished"]
    command = [sys.executable, "-m", "lightning_kd.report", "outputs/digits", "--output", "report"]
    assert subprocess.run(command, env=dict(os.environ, PYTHONPATH=python_path), capture_output=True).returncode == 0
    assert "| resnet56-resnet8 | kd | 1 |" in (tmp_path / "report" / "results.md").read_text()
