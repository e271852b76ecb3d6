"""qcompile: a deployment compiler for quantized LLMs built around ONNX.

    import qcompile
    art = qcompile.compile("smollm2-135m", target="ort-int4", out_dir="out/smollm2-int4")
    art.metrics["quantized"]["ppl"]
"""

__version__ = "0.1.0"

from qcompile.artifact import Artifact  # noqa: E402
from qcompile.errors import AccuracyGateError, QcompileError  # noqa: E402
from qcompile.fidelity import verify, verify_all  # noqa: E402
from qcompile.pipeline import compile, compile_many, evaluate, export  # noqa: E402

load = Artifact.load

__all__ = ["AccuracyGateError", "Artifact", "QcompileError", "compile", "compile_many", "evaluate", "export", "load", "verify",
           "verify_all", "__version__"]
