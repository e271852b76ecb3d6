"""What a pass hands back: onnx_ir's PassResult plus what it did, for the manifest."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir


@dataclasses.dataclass
class Result(ir.passes.PassResult):
    """`layers`: one manifest entry per linear the pass quantized or left float (see `_canonical.layer_record`);
    `record`: anything else the manifest keeps (chosen α per group, static scales, unfused blocks, ...)."""

    layers: list[dict] = dataclasses.field(default_factory=list)
    record: dict = dataclasses.field(default_factory=dict)

