"""The export is exact: PyTorch and ONNX Runtime FP32 perplexity of the same model on the pinned protocol.

    python benchmarks/bench_export_parity.py [--windows 128] [--source smollm2-135m]

Writes benchmarks/results/export_parity.{json,md}.
"""

from __future__ import annotations

import argparse

import numpy as np

import qcompile
from qcompile import evaluation, runtime, sources
from qcompile.export import load_hf
from _results import save

def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=evaluation.DEFAULT_WINDOWS)
    parser.add_argument("--source", default="smollm2-135m")
    args = parser.parse_args()

    folder = qcompile.export(args.source)
    tokenizer = runtime.load_tokenizer(folder)
    ort_ppl = evaluation.perplexity(runtime.Decoder(folder), tokenizer, args.windows).ppl
    model, _ = load_hf(sources.resolve(args.source))
    nll = 0.0
    with torch.no_grad():
        for window in evaluation.windows(tokenizer, args.windows):
            ids = torch.from_numpy(window[None])
            nll += float(model(ids, labels=ids).loss) * (len(window) - 1)
    torch_ppl = float(np.exp(nll / (args.windows * (evaluation.SEQ_LEN - 1))))
    result = {"windows": args.windows, "protocol": evaluation.PROTOCOL, "torch_ppl": round(torch_ppl, 4),
              "ort_fp32_ppl": round(ort_ppl, 4), "relative_difference_pct": round(100 * (ort_ppl / torch_ppl - 1), 4)}
    save("export_parity", result, ["| windows | PyTorch ppl | ORT FP32 ppl | difference |", "|---:|---:|---:|---:|",
                                   f"| {args.windows} | {torch_ppl:.4f} | {ort_ppl:.4f} | "
                                   f"{result['relative_difference_pct']:+.4f} % |"])


if __name__ == "__main__":
    main()
