"""WherePossible: float-equivalent passes run where the model's structure allows them, skipped (with the
reason recorded) where it does not."""

from __future__ import annotations

import onnx_ir as ir

from qcompile import errors
from qcompile.passes._result import Result


class WherePossible(ir.passes.InPlacePass):
    """Runs `passes` in order where the model's structure allows them; otherwise leaves the model as it is
    (each wrapped pass is float-equivalent, so either way logits(model) are unchanged) and records why. For float-equivalent rewrites that refuse a structure before they change anything (their
    UnsupportedModelError names the architectural fact): QuaRot's residual rotation on a LayerNorm or
    post-norm model, a value rotation on a fused qkv that interleaves its heads."""

    def __init__(self, *passes: ir.passes.PassBase):
        super().__init__()
        self.passes = passes
        self.manifest_name = "+".join(type(p).__name__ for p in passes)

    def call(self, model: ir.Model) -> Result:
        try:
            modified = [p(model).modified for p in self.passes]
        except errors.UnsupportedModelError as e:
            return Result(model, False, record={"skipped": str(e)})
        except ir.passes.PreconditionError as e:  # a check in `requires`, wrapped by onnx_ir
            if not isinstance(e.__cause__, errors.UnsupportedModelError):
                raise
            return Result(model, False, record={"skipped": str(e.__cause__)})
        return Result(model, any(modified))
