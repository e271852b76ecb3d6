"""Run a trt-* artifact's engine on a GPU and compare its logits with ONNX Runtime CPU on the same artifact.

    python benchmarks/trt_engine_gpu_check.py ARTIFACT [--out result.json]

Needs a CUDA GPU, torch with CUDA (for device buffers) and tensorrt or tensorrt-rtx. Uses the engine that
`qcompile build` wrote into the artifact (built ahead of time, possibly on a machine with no GPU): a
prompt through profile 0, then one cached decode step through profile 1, each compared with the ORT
Decoder on the artifact's model.onnx. Prints and writes the comparison as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from qcompile import engine as engine_mod  # noqa: E402
from qcompile.runtime import Decoder  # noqa: E402

PROMPT_LEN = 16


def run_engine(trt, eng, profile: int, feeds: dict[str, np.ndarray], torch) -> dict[str, np.ndarray]:
    context = eng.create_execution_context()
    stream = torch.cuda.Stream()
    context.set_optimization_profile_async(profile, stream.cuda_stream)
    keep = []
    for name, array in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        if tensor.numel() == 0:  # an empty cache still needs a valid address
            tensor = torch.empty(1, dtype=tensor.dtype, device="cuda")
        keep.append(tensor)
        context.set_input_shape(name, array.shape)
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for i in range(eng.num_io_tensors):
        name = eng.get_tensor_name(i)
        if eng.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
    assert context.execute_async_v3(stream.cuda_stream), "execute_async_v3 failed"
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(b).max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    import torch

    trt, package = engine_mod.tensorrt_module()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    started = time.perf_counter()
    eng = runtime.deserialize_cuda_engine((args.artifact / engine_mod.ENGINE_FILE).read_bytes())
    assert eng is not None, "the engine did not deserialize"
    result = {"device": torch.cuda.get_device_name(), "builder": f"{package} {trt.__version__}",
              "deserialize_s": round(time.perf_counter() - started, 2)}

    decoder = Decoder(args.artifact)
    vocab = json.loads((args.artifact / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, PROMPT_LEN)).astype(np.int64)
    cache = decoder.empty_cache()
    ort_logits, ort_cache = decoder.forward(ids, cache, 0)
    trt_out = run_engine(trt, eng, 0, decoder.feeds(ids, cache, 0), torch)
    result["prompt"] = compare(trt_out["logits"], ort_logits)

    step = ort_logits[:, -1:].argmax(-1).astype(np.int64)
    trt_cache = {n.replace("present.", "past_key_values."): v for n, v in trt_out.items() if n.startswith("present.")}
    ort_step, _ = decoder.forward(step, ort_cache, PROMPT_LEN)
    trt_step = run_engine(trt, eng, 1, decoder.feeds(step, trt_cache, PROMPT_LEN), torch)
    result["decode_step"] = compare(trt_step["logits"], ort_step)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
