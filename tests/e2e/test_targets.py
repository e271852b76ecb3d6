"""One recipe, every target, on SmolLM2-135M: TensorRT-RTX engine, onnxruntime-genai edge package, verify."""

import json
import zipfile

import numpy as np
import onnx_ir as ir
import pytest

import qcompile
from qcompile import evaluation, fidelity, generation, package, runtime
from qcompile.cli import main
from tests.e2e.conftest import WINDOWS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def artifacts(smollm2_export, tmp_path_factory):
    """trt-int4 (with its engine), ort-int4 and edge-int4 of one quantization, through the CLI, with RTN weights (the
    lowerings do not depend on the algorithm; test_smollm2 compiles the calibrated default); at accuracy_level 0, so
    that ort-int4's MatMulNBits computes in fp32 like the trt graph's DequantizeLinear → MatMul does when ORT runs it
    at that level."""
    root = tmp_path_factory.mktemp("targets")
    assert main(["model", "smollm2-135m", "--target", "trt-int4,ort-int4,edge-int4", "--engine", "--no-eval",
                 "--accuracy-level", "0", "--algo", "rtn", "--out", str(root)]) == 0
    return {"trt": qcompile.load(root / "trt-int4"), "ort": qcompile.load(root / "ort-int4"), "edge": qcompile.load(root / "edge-int4")}


def test_cli_builds_a_tensorrt_rtx_engine_for_trt_int4(artifacts):
    pytest.importorskip("tensorrt_rtx", reason="CI installs qcompile[tensorrt-rtx]")
    art = artifacts["trt"]
    record = art.manifest["engine"]
    assert record["builder"] in ("tensorrt", "tensorrt_rtx")
    assert (art.path / "model.engine").stat().st_size == record["bytes"] > 50e6  # the int4 weights are in it
    assert record["deserialized"] is True or record["deserialized"].startswith("not checked")
    assert art.manifest["fidelity"]["runtime_rules"] == "TensorRT's explicit-quantization rules: passed"
    assert main(["check", str(art.path)]) == 0
    assert main(["check", str(artifacts["ort"].path)]) == 1  # MatMulNBits is no TensorRT op


def test_trt_int4_perplexity_in_ort_equals_ort_int4(artifacts):
    # Same integers and scales, both computed in fp32: only the kernels' accumulation order differs. (At ORT's
    # default accuracy_level 4 each MatMulNBits rounds its input to int8, and the fused ort-int4 graph's
    # last-bit differences move that rounding: 0.7 % apart in perplexity on these windows, measured in CI.)
    ppl = {}
    for name, config in (("trt", {"session.qdq_matmulnbits_accuracy_level": 0}), ("ort", None)):
        decoder = runtime.Decoder(artifacts[name].path, session_config=config)
        ppl[name] = evaluation.perplexity(decoder, runtime.load_tokenizer(artifacts[name].path), WINDOWS).ppl
    assert abs(ppl["trt"] / ppl["ort"] - 1) <= 1e-4, ppl


def test_verify_same_integers_in_every_target(artifacts, capsys):
    for a, b in (("trt", "ort"), ("edge", "trt"), ("ort", "edge")):
        report = fidelity.verify(artifacts[a].path, against=artifacts[b].path)
        assert report["passed"], report["problems"]
        assert report["layers"] == 30 * 7 + 2  # the lm_head and the embedding table it shares
    assert main(["verify", str(artifacts["trt"].path), "--against", str(artifacts["edge"].path)]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_onnxruntime_genai_generates_qcompile_runs_greedy_tokens(artifacts, capsys):
    pytest.importorskip("onnxruntime_genai", reason="CI installs qcompile[edge]")
    folder = artifacts["edge"].path  # the 4-bit embedding table is lm_head's MatMulNBits weight, read by GatherBlockQuantized
    gather = next(n for n in ir.load(folder / "model.onnx").graph if n.op_type == "GatherBlockQuantized")
    assert gather.inputs[0].producer().op_type == "Reshape"
    golden = json.loads((folder / "golden.json").read_text())
    ids = golden["prompt_ids"]

    decoder = runtime.Decoder(folder)
    ours = list(generation.generate(decoder, ids, len(golden["greedy_ids"]), stop_ids=runtime.eos_token_ids(folder)))
    assert ours == golden["greedy_ids"]
    first, _ = decoder.forward(np.array([ids]), decoder.empty_cache(), 0)
    np.testing.assert_allclose(np.load(folder / "golden_logits.npy"), first[0, -1], atol=1e-5)

    assert package.genai_greedy(folder, ids, len(ours)) == ours

    # `qcompile run` prints the same continuation
    assert main(["run", str(folder), "--prompt", golden["prompt"], "-n", str(len(ours))]) == 0
    assert capsys.readouterr().out.strip() == (golden["prompt"] + golden["greedy_text"]).strip()

    with zipfile.ZipFile(folder.with_name(folder.name + ".zip")) as z:
        names = {n.split("/", 1)[1] for n in z.namelist()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json", "golden.json", "manifest.json"} <= names
