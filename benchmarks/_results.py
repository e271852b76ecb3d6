"""What every benchmark writes: results/<name>.json (with the run's metadata) and results/<name>.md."""

from __future__ import annotations

import json
import os
import pathlib
import platform

from qcompile import artifact, evaluation

RESULTS = pathlib.Path(__file__).parent / "results"


def meta(**extra) -> dict:
    """The protocol, machine and package versions of this run, plus `extra` (windows, source, ...)."""
    return {**extra, "protocol": evaluation.PROTOCOL,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": artifact.package_versions()}


def save(name: str, payload: dict, lines: list[str]) -> None:
    """Write the JSON payload and the markdown table `lines`, and print the table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
