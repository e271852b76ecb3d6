"""Resumable compiles: the finished work of a long weight quantization, kept beside the output folder.

A compile with a checkpoint saves every quantized linear (integers, scales, zero points) as it finishes,
and sequential GPTQ also the hidden state entering its next block, in `.<output name>.qcompile-state/`
next to the output folder. An interrupted compile rerun with `--resume` loads them instead of computing
them again, so the artifact it writes is byte-identical to an uninterrupted run's. The folder records a
fingerprint of everything that decides the result (source, target, recipe, calibration tokens); a resume
with a different fingerprint is refused. It is removed once the artifact is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np

from qcompile import errors
from qcompile.algorithms.rtn import QuantizedWeight

FINGERPRINT = "fingerprint.json"


def state_folder(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.qcompile-state"


class Checkpoint:
    def __init__(self, out: pathlib.Path, fingerprint: dict, resume: bool):
        self.folder = state_folder(out)
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        record = self.folder / FINGERPRINT
        if resume:
            if not record.is_file():
                raise errors.InputError(f"nothing to resume for '{out}': no saved state in '{self.folder}'; "
                                        "run without --resume")
            if json.loads(record.read_text())["sha256"] != digest:
                raise errors.InputError(f"the saved state in '{self.folder}' is from a compile with other settings "
                                        "(source, target, recipe or calibration differ): rerun with the same "
                                        "options, or without --resume to start over")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            _write_atomic(record, lambda f: f.write(json.dumps({"sha256": digest, "settings": fingerprint},
                                                               indent=2, default=str).encode()))

    def load_weight(self, name: str) -> QuantizedWeight | None:
        path = self.folder / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            zp = data["zero_point"] if "zero_point" in data else None
            return QuantizedWeight(data["q"], data["scale"], zp, int(data["bits"]), int(data["group_size"]))

    def save_weight(self, name: str, qw: QuantizedWeight) -> None:
        arrays = {"q": qw.q, "scale": qw.scale, "bits": qw.bits, "group_size": qw.group_size}
        if qw.zero_point is not None:
            arrays["zero_point"] = qw.zero_point
        _write_atomic(self.folder / f"{name}.npz", lambda f: np.savez(f, **arrays))

    def load_hidden(self) -> tuple[int, np.ndarray] | None:
        """(index of the next block, the hidden state entering it) saved by sequential GPTQ, or None."""
        path = self.folder / "hidden.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return int(data["block"]), data["hidden"]

    def save_hidden(self, block: int, hidden: np.ndarray) -> None:
        _write_atomic(self.folder / "hidden.npz", lambda f: np.savez(f, block=block, hidden=hidden))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: pathlib.Path, write) -> None:
    """Write through a temporary file and rename it, so that an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
