"""Artifacts on disk: atomic folder writes, file hashes and the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile

import onnx_ir as ir

from qcompile import errors
from qcompile.sources import file_sha256

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PACKAGES = ("qcompile", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch", "transformers", "gguf")


@dataclasses.dataclass
class Artifact:
    """A compiled model folder: model.onnx (+ model.onnx.data), tokenizer files, manifest.json."""

    path: pathlib.Path
    manifest: dict

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def model_path(self) -> pathlib.Path:
        return self.path / "model.onnx"

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "Artifact":
        path = pathlib.Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise errors.SourceNotFoundError(f"'{path}' is not a qcompile artifact (no {MANIFEST})")
        return cls(path, json.loads(manifest.read_text()))


def load_onnx(path: pathlib.Path) -> ir.Model:
    """Read an ONNX model, or raise CorruptModelError saying what is wrong with the file and what to do."""
    fix = "re-export it (`qcompile export`) or pass the right .onnx file"
    # protobuf reads zero bytes as a valid empty model, which would later look like an unsupported graph
    if path.is_file() and path.stat().st_size == 0:
        raise errors.CorruptModelError(f"cannot read ONNX model '{path}': the file is empty (0 bytes): {fix}")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise errors.CorruptModelError(
            f"cannot read ONNX model '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'corrupt'}): "
            f"it is not ONNX or it is incomplete: check that the file (and its .data file) is complete, or {fix}"
        ) from None
    if len(model.graph) == 0:
        raise errors.CorruptModelError(f"cannot read ONNX model '{path}': it holds no graph nodes, so it is not "
                                       f"an ONNX model (or it is truncated): {fix}")
    return model


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def file_hashes(folder: pathlib.Path) -> dict[str, dict]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST
    }


def model_bytes(model_path: pathlib.Path) -> int:
    """Bytes of an ONNX model file plus its external data files beside it."""
    folder = model_path.parent
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(model_path.name))


def copy_tokenizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in (*TOKENIZER_FILES, "config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def check_output(out: pathlib.Path) -> None:
    """Before any work: refuse to overwrite anything but an earlier qcompile artifact or export, and prove a
    file can be made where `out` goes (its parent folders are created for the test and removed again)."""
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or (out / "model.onnx").is_file())):
        raise errors.OutputExistsError(
            f"output '{out}' exists and is not a qcompile artifact: choose another --out or remove it"
        )
    _check_writable(out)


def _check_writable(out: pathlib.Path) -> None:
    parent = out.parent  # the output is written beside `out`, then renamed into place
    ancestors = [parent, *parent.parents]  # deepest first
    blocking = next((p for p in reversed(ancestors) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise _unwritable(out, f"'{blocking}' is a file, not a folder")
    created = [p for p in ancestors if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".qcompile-write-test.", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        where = next((p for p in ancestors if p.exists()), parent)
        raise _unwritable(out, f"cannot create files in '{where}' ({e.strerror or type(e).__name__})") from None
    finally:
        for folder in created:  # deepest first; atomic_folder makes them again when the output is written
            with contextlib.suppress(OSError):
                folder.rmdir()


def _unwritable(out: pathlib.Path, reason: str) -> errors.InputError:
    return errors.InputError(f"cannot write the output '{out}': {reason}: choose another --out (a folder you can write to)")


def _umask() -> int:
    """The process umask: from /proc where Linux shows it, else set and restored at once (os.umask's only read)."""
    with contextlib.suppress(OSError, ValueError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name != "posix":  # Windows' os.kill(pid, 0) would terminate the process: keep the folder
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(out: pathlib.Path) -> list[pathlib.Path]:
    """Remove the temporary folders of `out` that a killed qcompile left beside it; return them.

    `atomic_folder` names its folders `.<name>.<pid>.<random>.tmp` (before: `.<name>.<random>.tmp`) and the
    replaced output `.<name>.old-<pid>`; a folder is stale when that pid is no live process, or has no pid.
    """
    name = re.escape(out.name)
    owned = re.compile(rf"\.{name}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp|\.{name}\.old-(\d+)")
    stale = []
    with contextlib.suppress(FileNotFoundError):
        for p in out.parent.iterdir():
            m = owned.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m[1] or m[2] or 0)):
                shutil.rmtree(p, ignore_errors=True)
                stale.append(p)
    return stale


@contextlib.contextmanager
def atomic_folder(out: pathlib.Path):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, else it is removed.
    Temporary folders that killed runs left beside `out` are removed first."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact is an ordinary folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(out: pathlib.Path):
    """Hold an exclusive lock on `out` (a file `.<name>.lock` beside it) across processes, where the OS has
    POSIX file locks; elsewhere nothing is locked."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def scratch_folder(out: pathlib.Path):
    """Yield a temporary working folder beside `out` (named like `atomic_folder`'s, so a killed run's is
    removed by the next); it is always removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: pathlib.Path, manifest: dict) -> None:
    manifest["files"] = file_hashes(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def write_manifest_atomic(folder: pathlib.Path, manifest: dict) -> None:
    """Rewrite an existing artifact's manifest (after adding a file to it) in one rename."""
    manifest["files"] = file_hashes(folder)
    publish_text(folder / MANIFEST, json.dumps(manifest, indent=2))


def publish_text(dst: pathlib.Path, text: str) -> None:
    """Write `text` to `dst` in one rename: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    publish(pathlib.Path(tmp), dst)


def publish(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Move a finished temporary file into place in one rename, with ordinary permissions."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, dst)
