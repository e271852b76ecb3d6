"""Every error before the work, and every stop said: unwritable outputs, Ctrl-C, killed runs' leftovers,
empty model files, colour only on terminals, and an import that changes nothing. Hand-made files only."""

import errno
import os
import pathlib
import subprocess
import sys
import time

import onnx_ir as ir
import pytest
from rich.console import Console

from qcompile import artifact, cli, errors, pipeline
from qcompile.cli import main
from qcompile.progress import RichProgress
from qcompile.targets.trt import Violation
from tests.conftest import single_matmul_model


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# (a) an output that cannot be written is bad input, found before any work

@pytest.mark.parametrize("under", ["file.txt/out", "file.txt/out/deeper"])
def test_output_under_a_file_is_refused(tmp_path, under):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(errors.InputError, match=r"file\.txt' is a file, not a folder: choose another --out"):
        artifact.check_output(tmp_path / under)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_output_in_a_read_only_place_is_refused():
    with pytest.raises(errors.InputError, match=r"cannot create files in '/proc'.*choose another --out"):
        artifact.check_output(pathlib.Path("/proc/qcompile-out"))


def test_failed_write_test_removes_the_folders_it_made(tmp_path, monkeypatch):
    def read_only(*_, **__):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(artifact.tempfile, "mkstemp", read_only)
    with pytest.raises(errors.InputError, match="Read-only file system"):
        artifact.check_output(tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []


def test_passed_write_test_leaves_nothing(tmp_path):
    artifact.check_output(tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_unwritable_out_before_loading_the_model(capsys, tmp_path, monkeypatch):
    ir.save(single_matmul_model(), tmp_path / "model.onnx")
    (tmp_path / "file.txt").write_text("")
    monkeypatch.setattr(artifact, "load_onnx", lambda *_: pytest.fail("the model was loaded before the output check"))
    assert main(["model", str(tmp_path / "model.onnx"), "-o", str(tmp_path / "file.txt" / "out"), "--no-eval"]) == 2
    err = _one_error_line(capsys)
    assert "cannot write the output" in err and "choose another --out" in err


# (b) Ctrl-C: exit 130 and one line saying what stopped

def _interrupt_compile(monkeypatch, stage=None, steps=0, total=3):
    def compile_(*_, progress=None, **__):
        if stage:
            advance = progress.task(stage, total)
            for _ in range(steps):
                advance()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "compile", compile_)


def test_ctrl_c_before_any_stage_is_one_line(monkeypatch, capsys):
    _interrupt_compile(monkeypatch)
    assert main(["model", "anything", "--no-eval"]) == 130
    err = _one_error_line(capsys)
    assert err == "interrupted: no artifact was written"


def test_ctrl_c_in_gptq_names_the_stage_and_resume(monkeypatch, capsys):
    _interrupt_compile(monkeypatch, "GPTQ, parallel (blocks)", steps=1)
    assert main(["model", "anything", "--algo", "gptq", "--no-eval"]) == 130
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert said == [err.strip().splitlines()[-1]]  # above it only the progress bars' last state
    assert said[0] == ("interrupted during GPTQ, parallel (blocks): no artifact was written; "
                       "rerun with --resume to continue from the last finished layer")


def test_ctrl_c_in_an_rtn_compiles_lm_head_gptq_offers_no_resume(monkeypatch, capsys):
    _interrupt_compile(monkeypatch, "Quantizing weights (GPTQ)")  # ort-int4's lm_head: --resume would be refused
    assert main(["model", "anything", "--no-eval"]) == 130
    assert "--resume" not in capsys.readouterr().err


def test_ctrl_c_after_a_finished_stage_says_after(monkeypatch, capsys):
    _interrupt_compile(monkeypatch, "Calibrating (embeddings)", steps=3)
    assert main(["model", "anything", "--no-eval"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted after Calibrating (embeddings): no artifact was written")


def test_ctrl_c_in_export_and_the_next_run_forgets_the_stage(monkeypatch, capsys):
    _interrupt_compile(monkeypatch, "GPTQ, parallel (blocks)")
    assert main(["model", "anything", "--no-eval"]) == 130
    capsys.readouterr()

    def export(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export", export)
    assert main(["export", "anything", "-o", "unused"]) == 130
    assert _one_error_line(capsys) == "interrupted: no export was written"
    assert RichProgress.stage is None


# (c) a killed run's temporary folders are removed by the next run

def _dead_pid() -> int:
    return int(pathlib.Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above pid_max: never a process


@pytest.mark.skipif(not pathlib.Path("/proc/sys/kernel/pid_max").is_file(), reason="needs Linux /proc")
def test_atomic_folder_removes_only_dead_runs_temporaries(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    stale = [f".exp.{dead}.abcd_123.tmp", ".exp.k2j4h5g6.tmp", f".exp.old-{dead}"]  # dead pid, old format (no pid)
    kept = [f".exp.{live}.live_123.tmp", f".exp.old-{live}",  # a live run's
            f".exp.b.{dead}.abcd_123.tmp", ".exp.qcompile-state", "other"]  # output exp.b's, a GPTQ checkpoint's
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"partial")
    with artifact.atomic_folder(tmp_path / "exp") as tmp:
        assert tmp.name.startswith(f".exp.{live}.") and tmp.name.endswith(".tmp")
        (tmp / "model.onnx").write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["exp"])
    assert (tmp_path / "exp" / "model.onnx").read_bytes() == b"done"


def test_a_killed_export_is_cleaned_by_the_next(tmp_path):
    code = ("import os, pathlib, signal, sys; from qcompile import artifact\n"
            "with artifact.atomic_folder(pathlib.Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'model.onnx').write_bytes(b'half')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "exp")], cwd=pathlib.Path(__file__).parents[1])
    assert run.returncode == -9
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
    with artifact.atomic_folder(tmp_path / "exp") as tmp:
        (tmp / "model.onnx").write_bytes(b"done")
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]


# (d) an empty or non-ONNX model file says so

def test_load_onnx_names_an_empty_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(errors.CorruptModelError, match=r"empty \(0 bytes\): re-export it"):
        artifact.load_onnx(tmp_path / "model.onnx")


def test_load_onnx_names_a_file_that_is_not_onnx(tmp_path):
    (tmp_path / "notes.onnx").write_text("hello, this is text\n")
    with pytest.raises(errors.CorruptModelError, match="it is not ONNX or it is incomplete"):
        artifact.load_onnx(tmp_path / "notes.onnx")
    ir.save(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), tmp_path / "nodeless.onnx")
    with pytest.raises(errors.CorruptModelError, match="holds no graph nodes"):
        artifact.load_onnx(tmp_path / "nodeless.onnx")


@pytest.mark.parametrize("args", [["inspect", "{d}/model.onnx"], ["inspect", "{d}"], ["check", "{d}"],
                                  ["model", "{d}", "--no-eval", "-o", "{d}/out"]])
def test_cli_says_an_empty_model_is_empty(capsys, tmp_path, args):
    (tmp_path / "model.onnx").write_bytes(b"")
    assert main([a.format(d=tmp_path) for a in args]) == 2
    err = _one_error_line(capsys)
    assert "is empty (0 bytes)" in err and "re-export it" in err


# (e) no ANSI codes when the output is not a terminal

@pytest.fixture
def no_forced_colour(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    # a console made while stdout was a terminal (e.g. `pytest -s`) must not outlive it
    monkeypatch.setattr(cli, "console", Console(force_terminal=True))


def test_no_ansi_codes_when_not_a_terminal(no_forced_colour, capsys, tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(b"")
    outcomes = [main(["targets"]), main(["inspect", str(tmp_path)]), main(["targets", "--bogus"])]
    assert outcomes == [0, 2, 2]
    monkeypatch.setattr(artifact, "load_onnx", lambda *_: single_matmul_model())
    monkeypatch.setattr("qcompile.targets.trt.check_tensorrt",
                        lambda _: [Violation("matmul", "MatMul has no quantized input")])
    assert main(["check", str(tmp_path)]) == 1  # a [red]✗[/red] line on stdout
    captured = capsys.readouterr()
    assert "ort-int4" in captured.out and "✗ MatMul has no quantized input" in captured.out
    assert "\x1b[" not in captured.out and "\x1b[" not in captured.err


# (f) importing changes nothing

def test_importing_artifact_leaves_the_umask_alone():
    code = ("import os\ndef umask(_): raise AssertionError('os.umask called at import')\n"
            "os.umask = umask\nimport qcompile.artifact")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_artifact_folders_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert artifact._umask() == 0o027
        with artifact.atomic_folder(tmp_path / "art"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "art").stat().st_mode & 0o777 == 0o750


def test_one_export_per_cache_entry_however_many_processes_ask(tmp_path):
    # the second process waits for the first one's lock instead of exporting the same model beside it
    out, started, done = tmp_path / "export", tmp_path / "started", tmp_path / "done"
    first = subprocess.Popen([sys.executable, "-c", f"""
import pathlib, time
from qcompile import artifact
with artifact.exclusive(pathlib.Path({str(out)!r})):
    pathlib.Path({str(started)!r}).touch()
    time.sleep(1)
    pathlib.Path({str(done)!r}).touch()
"""])
    while not started.exists():
        assert first.poll() is None, "the first process ended without taking the lock"
        time.sleep(0.01)
    with artifact.exclusive(out):
        assert done.exists()
    assert first.wait() == 0
