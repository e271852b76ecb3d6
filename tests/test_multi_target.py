"""`--target a,b,c`: one quantization, lowered to each target, verified across them."""

import json

import pytest

import qcompile
from qcompile import errors, package, pipeline, runtime
from qcompile.cli import main

CANONICAL_TARGETS = ["ort-int4", "trt-int4", "edge-int4"]


def test_one_quantization_lowered_to_each_target_and_verified(tiny_export, tmp_path, monkeypatch, capsys):
    _, path = tiny_export("llama")
    built = []
    build_passes = pipeline.build_passes
    monkeypatch.setattr(pipeline, "build_passes", lambda *a, **k: built.append(a[0].target) or build_passes(*a, **k))
    out = tmp_path / "all"
    assert main(["model", str(path), "--target", ",".join(CANONICAL_TARGETS), "-o", str(out), "--no-eval"]) == 0
    assert built == ["ort-int4"]  # the weights were quantized once
    assert sorted(p.name for p in out.iterdir()) == sorted([*CANONICAL_TARGETS, "edge-int4.zip"])  # no scratch left
    arts = [qcompile.load(out / name) for name in CANONICAL_TARGETS]
    assert len({a.manifest["fidelity"]["weights"].__repr__() for a in arts}) == 1
    assert [a.manifest["target"]["name"] for a in arts] == CANONICAL_TARGETS
    assert "integers and scales are bit-identical" in capsys.readouterr().out
    assert main(["inspect", str(out / "ort-int4")]) == 0  # the table is lm_head's MatMulNBits weight
    assert "GatherBlockQuantized of lm_head.weight_nbits_B [256, 1, 32] UINT8 (lm_head's weight, shared)" in capsys.readouterr().out
    report = qcompile.verify_all([a.path for a in arts])
    assert report["passed"] and len(report["pairs"]) == 2, report


def test_targets_that_quantize_differently_are_refused_before_any_work(tiny_export, tmp_path):
    _, path = tiny_export("llama")
    with pytest.raises(errors.InputError, match="ort-int4 and ort-w8a8 quantize differently .*weights.*compile them separately"):
        qcompile.compile_many(path, ["ort-int4", "ort-w8a8"], tmp_path / "x", eval_windows=None)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits, cache_type", [(8, "tensor(int8)"), (4, "tensor(uint8)")])
def test_a_quantized_kv_cache_is_stored_quantized_on_ort_and_emulated_on_tensorrt(tiny_export, tmp_path, bits, cache_type):
    """ORT and edge store the cache quantized in GroupQueryAttention; trt-int4 keeps the canonical emulated
    cache (fp32, QuantizeDequantizeStatic): `verify` compares their logits. onnxruntime-genai, the edge
    package's client, allocates the quantized cache from the model's inputs and generates the golden tokens."""
    _, path = tiny_export("llama")
    out = tmp_path / "kv"
    arts = qcompile.compile_many(path, CANONICAL_TARGETS, out, eval_windows=None, kv_cache_bits=bits, algo="rtn")
    types = {name: {i.type for i in runtime.Decoder(art.path).session.get_inputs() if i.name.startswith("past_")}
             for name, art in arts.items()}
    assert types == {"ort-int4": {cache_type}, "edge-int4": {cache_type}, "trt-int4": {"tensor(float)"}}
    report = qcompile.verify_all([arts[t].path for t in CANONICAL_TARGETS])
    assert report["passed"], report
    assert all(pair["logits"]["argmax_agreement"] == 1.0 for pair in report["pairs"])
    pytest.importorskip("onnxruntime_genai", reason="CI installs qcompile[edge]")
    golden = json.loads((arts["edge-int4"].path / "golden.json").read_text())
    assert package.genai_greedy(arts["edge-int4"].path, golden["prompt_ids"], len(golden["greedy_ids"])) == golden["greedy_ids"]
