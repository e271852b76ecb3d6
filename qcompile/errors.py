"""Typed errors. Each message names the problem and the fix; the CLI prints it as one line.

Exit codes: 2 for bad input (the user can fix it), 3 for a compile that failed its accuracy gate, 1 for
internal errors.
"""

from __future__ import annotations

import onnx_ir as ir


class QcompileError(Exception):
    """Base class of every error qcompile raises on purpose."""

    exit_code = 1


class InputError(QcompileError, ir.passes.PreconditionError):
    """The input (a path, a model, an option) is wrong; the message says how to fix it. Also onnx_ir's
    PreconditionError: raised by a pass's `requires()`, it reaches the caller as it is, not wrapped."""

    exit_code = 2


class SourceNotFoundError(InputError):
    """A model source (path or alias) does not exist."""


class CorruptModelError(InputError):
    """A model file exists but cannot be read."""


class UnsupportedModelError(InputError):
    """The graph is readable but its transformer structure was not recognised."""


class UnknownTargetError(InputError):
    """A target name is not in the registry."""


class MissingDependencyError(InputError):
    """An optional dependency is needed for this input; the message gives the pip command."""


class OutputExistsError(InputError):
    """The output path exists and is not a qcompile artifact that may be replaced."""


class VerificationError(QcompileError):
    """An artifact's weights or outputs do not match what they must (a tampered or broken file)."""


class AccuracyGateError(QcompileError):
    """The quantized model's perplexity rose past the bound the caller set (`max_ppl_increase`); nothing
    was written. `metrics` holds what was measured (the manifest's metrics), `bound` the percent allowed."""

    exit_code = 3

    def __init__(self, metrics: dict, bound: float, tried: str = ""):
        self.metrics, self.bound = metrics, bound
        fix = tried or "(a calibrated recipe such as --algo gptq loses less; or raise the bound)"
        super().__init__(
            f"accuracy gate failed: perplexity {metrics['quantized']['ppl']:.3f} against float {metrics['float']['ppl']:.3f} "
            f"is {metrics['ppl_increase_pct']:+.2f} %, past --max-ppl-increase {bound:g} %: nothing was written {fix}")
