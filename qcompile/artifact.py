"""Artifacts on disk: atomic folder writes, file hashes and the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import pathlib
import shutil
import tempfile

import onnx_ir as ir

from qcompile import errors
from qcompile.sources import file_sha256

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_UMASK = os.umask(0)
os.umask(_UMASK)
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
    try:
        return ir.load(path)
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise errors.CorruptModelError(
            f"cannot read ONNX model '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'corrupt'}): "
            "check that the file (and its .data file) is complete"
        ) from None


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
    """Refuse to overwrite anything but an earlier qcompile artifact or export."""
    if out.exists() and not (out.is_dir() and ((out / MANIFEST).is_file() or (out / "model.onnx").is_file())):
        raise errors.OutputExistsError(
            f"output '{out}' exists and is not a qcompile artifact: choose another --out or remove it"
        )


@contextlib.contextmanager
def atomic_folder(out: pathlib.Path):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, else it is removed."""
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; the artifact is an ordinary folder
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


def write_manifest(folder: pathlib.Path, manifest: dict) -> None:
    manifest["files"] = file_hashes(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def write_manifest_atomic(folder: pathlib.Path, manifest: dict) -> None:
    """Rewrite an existing artifact's manifest (after adding a file to it) in one rename."""
    manifest["files"] = file_hashes(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2))
    publish(pathlib.Path(tmp), folder / MANIFEST)


def publish(tmp: pathlib.Path, dst: pathlib.Path) -> None:
    """Move a finished temporary file into place in one rename, with ordinary permissions."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, dst)
