"""The error per-token int4 leaves in the outputs of the linears that read a block norm, by the scaling s
applied before the rotation (SmoothRotateNormOutputs' choice of s, measured layer by layer on SmolLM2).

    python benchmarks/bench_norm_rotation_error.py [--windows 4] [--clip 0.75]

For blocks 0, 5, 15, 25, 29 and each norm (input: q/k/v; post-attention: gate/up): x̂ = the norm's input
over its rms (calibration tokens, every 4th), y = x̂·diag(γ)·W the readers' float outputs, and for
s = (‖γ_j·W_j‖ / rms(x̂_j))^α: the readers' output error when x̂·s is rotated by a random Hadamard Q,
quantized per token to int4 (clip ratio --clip) and rotated back, ‖(Qnt(x̂sQ) − x̂sQ)·Qᵀ·diag(γ/s)·W‖ / ‖y‖.
α = 0 is QuaRot's rotation; α = ½ is the pass's default. Writes benchmarks/results/norm_rotation_error.{json,md}.
"""

from __future__ import annotations

import argparse

import numpy as np

import qcompile
from qcompile import analysis, artifact, calibration, recipe, runtime
from qcompile.algorithms.hadamard import random_orthogonal
from _results import meta, save

ALPHAS = (0.0, 0.25, 0.5, 0.75)
BLOCKS = (0, 5, 15, 25, 29)


def per_token_int4(v: np.ndarray, clip: float) -> np.ndarray:
    scale = clip * np.abs(v).max(axis=-1, keepdims=True) / 7
    return np.clip(np.round(v / scale), -7, 7) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--clip", type=float, default=recipe.INT4_CLIP)
    args = parser.parse_args()

    float_dir = qcompile.export("smollm2-135m")
    model = artifact.load_onnx(float_dir / "model.onnx")
    mm = analysis.analyze(model)
    windows = calibration.calibration_windows(runtime.load_tokenizer(float_dir), None, args.windows)
    q = random_orthogonal(mm.hidden_size, 0)
    R = analysis.Role
    rows = []
    for index in BLOCKS:
        block = mm.blocks[index]
        for norm, roles in ((block.input_norm, (R.Q, R.K, R.V)), (block.post_attention_norm, (R.GATE, R.UP))):
            x = calibration.values(model, norm.input, windows).reshape(-1, mm.hidden_size).astype(np.float64)[::4]
            x_hat = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-5)
            gw = norm.gain.const_value.numpy().astype(np.float64)[:, None] * np.concatenate(
                [block.linears[r].float_weight() for r in roles], axis=1).astype(np.float64)
            y = x_hat @ gw
            errors = {}
            for alpha in ALPHAS:
                s = (np.linalg.norm(gw, axis=1) / np.sqrt((x_hat**2).mean(axis=0))) ** alpha
                v = (x_hat * s) @ q
                errors[alpha] = float(np.linalg.norm((per_token_int4(v, args.clip) - v) @ q.T @ (gw / s[:, None])) / np.linalg.norm(y))
            rows.append({"block": index, "readers": "+".join(r.value for r in roles), "relative_error": errors})
            print(rows[-1], flush=True)
    lines = [f"Readers' relative output error under per-token int4 (clip {args.clip}) of the rotated norm output, "
             f"SmolLM2-135M, {args.windows} calibration windows (every 4th token); s_j = (‖γ_j W_j‖ / rms(x̂_j))^α.", "",
             "| block | readers | " + " | ".join(f"α = {a}" for a in ALPHAS) + " | α=0 / α=½ |",
             "|---:|---|" + "---:|" * (len(ALPHAS) + 1)]
    for r in rows:
        e = r["relative_error"]
        lines.append(f"| {r['block']} | {r['readers']} | " + " | ".join(f"{100 * e[a]:.1f} %" for a in ALPHAS)
                     + f" | {e[0.0] / e[0.5]:.2f}× |")
    save("norm_rotation_error", {"meta": meta(windows=args.windows, clip=args.clip), "rows": rows}, lines)


if __name__ == "__main__":
    main()
