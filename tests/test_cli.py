"""The CLI contract: exit codes, one-line errors, nothing written on bad input, the shorthand form."""

import json
import os

import onnx_ir as ir
import pytest

from qcompile import artifact
from qcompile.cli import main
from tests.conftest import single_matmul_model


def _fails_cleanly(capsys, tmp_path, args, match, code=2):
    out = tmp_path / "out"  # where the model cases below ask for their artifact
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folders left
    return err


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "corrupt.onnx").write_bytes(os.urandom(2000))
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    (tmp_path / "notllm").mkdir()
    ir.save(single_matmul_model(), tmp_path / "notllm" / "model.onnx")
    return tmp_path


@pytest.mark.parametrize("args,match", [
    (["model", "missing.onnx"], "not found"),
    (["missing.onnx", "--target", "ort-int4"], "not found"),  # shorthand reaches `model`
    (["model", "{d}/corrupt.onnx"], "cannot read ONNX model"),
    (["model", "{d}/corrupt.gguf"], "not a readable GGUF"),
    (["model", "{d}/notllm/model.onnx"], "no token-embedding Gather"),
    (["model", "{d}/notllm", "--target", "trt-int9"], "unknown target 'trt-int9'"),
    (["model", "{d}/notllm", "--algo", "hqq"], "unknown algorithm"),
    (["model", "{d}/notllm", "--group-size", "48"], "power of two"),
    (["model", "{d}/notllm", "--algo", "gptq", "--gptq-mode", "serial"], "unknown GPTQ mode 'serial'"),
    (["model", "{d}/notllm", "--algo", "awq", "--gptq-mode", "sequential"], "sequential mode is GPTQ's"),
    (["model", "{d}/notllm", "--target", "trt-int4", "--asymmetric"], "symmetric weights with positive scales"),
    (["model", "{d}/notllm", "--target", "trt-int4", "--signed-scales"], "symmetric weights with positive scales"),
    (["model", "{d}/notllm", "--target", "ort-int4", "--engine"], "--engine builds TensorRT engines"),
    (["model", "{d}/notllm", "--target", "trt-int8", "--alpha", "strong"], "not a number in 0..1 or 'auto'"),
    (["model", "{d}/notllm", "--target", "trt-int8", "--alpha", "1.5"], "alpha 1.5 is out of range"),
    (["model", "{d}/notllm", "--activations", "int3"], "unknown activation scheme 'int3'"),
    (["model", "{d}/notllm", "--target", "trt-int8", "--activations", "int8-dynamic"], "static per tensor"),
    (["model", "{d}/notllm", "--target", "trt-fp8", "--algo", "gptq"], "FP8 weights are rounded to nearest"),
    (["model", "{d}/notllm", "--resume", "--algo", "rtn"], "--resume continues GPTQ compiles"),
    (["model", "{d}/notllm", "--rotation", "learned"], "unknown rotation 'learned'"),
    (["model", "{d}/notllm", "--target", "ort-int4", "--rotation", "smoothed"], "add --rotate or drop --rotation"),
    (["model", "{d}/notllm", "--max-ppl-increase", "5", "--no-eval"], "drop --no-eval, or drop the gate"),
    (["model", "{d}/notllm", "--max-ppl-increase", "-1"], "use a number >= 0"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(capsys, bad_files, args, match):
    args = [a.format(d=bad_files) for a in args] + ["-o", str(bad_files / "out")]
    _fails_cleanly(capsys, bad_files, args, match)


@pytest.mark.parametrize("args,match", [
    (["eval", "missing"], "not found"),
    (["inspect", "{d}/corrupt.onnx"], "cannot read ONNX model"),
    (["inspect", "{d}/notllm"], "not a supported"),
    (["run", "{d}/notllm", "--prompt", "hi"], "lacks decoder inputs"),
    (["build", "{d}/notllm"], "is not a qcompile artifact"),
    (["package", "{d}/notllm"], "is not a qcompile artifact"),
    (["verify", "{d}/notllm"], "is not a qcompile artifact"),
    (["check", "{d}/corrupt.onnx"], "cannot read ONNX model"),
    (["check", "{d}/notllm", "--target", "ort-int4"], "not a trt-* target"),
])
def test_other_commands_fail_cleanly(capsys, bad_files, args, match):
    _fails_cleanly(capsys, bad_files, [a.format(d=bad_files) for a in args], match)


def test_refuses_to_overwrite_a_foreign_folder(capsys, tiny_export, tmp_path):
    _, path = tiny_export("llama")
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["model", str(path), "-o", str(out), "--no-eval"]) == 2
    assert "not a qcompile artifact" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_usage_errors_exit_2(capsys):
    assert main(["eval"]) == 2  # missing argument
    assert main(["model", "--eval-windows", "many"]) == 2


@pytest.mark.parametrize("command", ["model", "export", "eval", "run", "inspect", "targets"])
def test_help_on_every_command(capsys, command):
    assert main([command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_targets_lists_ort_int4(capsys):
    assert main(["targets"]) == 0
    assert "ort-int4" in capsys.readouterr().out


def test_compile_inspect_and_replace_on_a_tiny_model(capsys, tiny_export, tmp_path):
    _, path = tiny_export("qwen2")
    out = tmp_path / "art"
    assert main([str(path), "--target", "ort-int4", "-o", str(out), "--no-eval", "--group-size", "32", "--algo", "rtn"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["weights"]["group_size"] == 32
    assert len(manifest["layers"]) == 2 * 7 + 2  # and the (untied) embedding table, by its own RTN
    # ort-int4's lm_head is 4-bit GPTQ in groups of 64, calibrated first (windows capped at the 256-token context)
    assert manifest["layers"][-2] == {"name": "lm_head", "role": "lm_head", "shape": [64, 256], "bits": 4,
                                      "group_size": 64, "symmetric": True, "algorithm": "gptq"}
    assert manifest["layers"][-1]["name"] == "embedding" and manifest["layers"][-1]["algorithm"] == "rtn"
    # one calibration run serves the lm_head's GPTQ, which runs before the blocks' RTN
    assert [p["name"] for p in manifest["passes"]][:3] == ["Calibrate", "QuantizeWeightsGPTQ", "QuantizeWeightsRTN"]
    assert manifest["calibration"]["seqlen"] == 256 and manifest["recipe"]["calibration"]["seqlen"] == 512
    for name, entry in manifest["files"].items():
        assert artifact.file_sha256(out / name) == entry["sha256"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.down" in text and "MatMulNBits 4-bit block 32" in text and "lm_head" in text
    # compiling again replaces the earlier artifact in one rename
    assert main(["model", str(path), "-o", str(out), "--no-eval", "--asymmetric"]) == 0
    assert json.loads((out / "manifest.json").read_text())["recipe"]["weights"]["symmetric"] is False


def test_evaluation_refuses_a_context_shorter_than_its_windows(capsys, tiny_export, tmp_path):
    _, path = tiny_export("llama")  # 256 positions: the 512-token windows would fail inside ORT
    _fails_cleanly(capsys, tmp_path, ["model", str(path), "-o", str(tmp_path / "out"), "--eval-windows", "1"],
                   "context (256 tokens) is shorter than the 512-token evaluation windows")


def test_a_calibration_that_cannot_fit_in_memory_is_refused_before_any_work(monkeypatch, capsys, tiny_export, tmp_path):
    from qcompile import pipeline

    _, path = tiny_export("llama")
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1000)  # less than the tiny model's weights
    ran = []
    monkeypatch.setattr(pipeline, "run_passes", lambda *a: ran.append(a))
    _fails_cleanly(capsys, tmp_path, ["model", str(path), "-o", str(tmp_path / "out"), "--no-eval"],
                   "pass --algo gptq (it calibrates one block at a time) or --algo rtn --lm-head int8")
    assert not ran
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "available_memory", lambda: 1000)
    # block-by-block GPTQ and an uncalibrated recipe hold no whole-model session: they compile
    for options in (["--algo", "gptq"], ["--algo", "rtn", "--lm-head", "int8"]):
        assert main(["model", str(path), "-o", str(tmp_path / "ok"), "--no-eval", *options]) == 0


def test_interrupted_compile_leaves_nothing(monkeypatch, capsys, tiny_export, tmp_path):
    _, path = tiny_export("llama")

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_manifest", interrupt)
    assert main(["model", str(path), "-o", str(tmp_path / "out"), "--no-eval", "--algo", "rtn"]) == 130
    assert list(tmp_path.iterdir()) == []
    assert main(["model", str(path), "-o", str(tmp_path / "out"), "--no-eval", "--algo", "gptq"]) == 130  # kept for --resume
    assert [p.name for p in tmp_path.iterdir()] == [".out.qcompile-state"]


def test_check_verify_and_package_report_problems(capsys, tiny_export, tmp_path):
    _, path = tiny_export("llama")
    ort = tmp_path / "ort"
    assert main(["model", str(path), "--target", "ort-int4", "--no-eval", "-o", str(ort), "--signed-scales"]) == 0
    capsys.readouterr()
    assert main(["check", str(ort)]) == 1  # MatMulNBits is not a TensorRT op
    captured = capsys.readouterr()
    assert "MatMulNBits has no TensorRT plugin" in captured.out and "violation(s) of TensorRT's explicit-quantization rules" in captured.err
    assert main(["verify", str(ort)]) == 0
    trt = tmp_path / "trt"
    assert main(["model", str(path), "--target", "trt-int4", "--no-eval", "-o", str(trt)]) == 0
    capsys.readouterr()
    assert main(["check", str(trt)]) == 0
    assert main(["package", str(trt)]) == 2  # an edge package is for ONNX Runtime artifacts
    assert "compile with --target edge-int4" in capsys.readouterr().err
    # ORT's signed scales are not trt-int4's integers: verify fails and names the layer and tensor
    assert main(["verify", str(trt), "--against", str(ort)]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "blocks.0." in err and "weight_q" in err

    # fold blocks.1.up's weight DequantizeLinear back to a float initializer, as onnxsim would
    from qcompile import analysis

    model = ir.load(trt / "model.onnx")
    up = next(lin for lin in analysis.analyze(model).linears() if lin.name == "blocks.1.up")
    dq = up.weight_input.producer()
    q, scale = (v.const_value.numpy().astype("float32") for v in dq.inputs[:2])
    folded = ir.Value(name="folded_up", const_value=ir.tensor(q * scale.repeat(q.shape[0] // scale.shape[0], 0),
                                                                name="folded_up"))
    model.graph.register_initializer(folded)
    up.node.replace_input_with(1, folded)
    ir.save(model, trt / "model.onnx", external_data="model.onnx.data")
    capsys.readouterr()
    assert main(["check", str(trt)]) == 1
    out = capsys.readouterr().out
    assert "folded back to float" in out and "blocks.1.up" in out


def test_float_perplexity_of_an_onnx_source_is_evaluated_once(monkeypatch, tmp_path):
    import qcompile
    from qcompile import evaluation
    from qcompile.export import export_model
    from tests.conftest import tiny_hf_model, write_byte_tokenizer

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))  # no float evaluation left by other tests
    folder = tmp_path / "src"  # 1024 positions: room for the 512-token evaluation windows
    folder.mkdir()
    path = export_model(tiny_hf_model("llama", max_position_embeddings=1024), folder)
    write_byte_tokenizer(folder)
    evaluated = []
    real = evaluation.evaluate_model
    monkeypatch.setattr(evaluation, "evaluate_model", lambda p, *a, **k: evaluated.append(p) or real(p, *a, **k))
    first = qcompile.compile(path, "ort-int4", tmp_path / "a", algo="rtn", lm_head_bits=8, eval_windows=1, max_ppl_increase=50)
    second = qcompile.compile(path, "ort-int4", tmp_path / "b", algo="rtn", lm_head_bits=8, eval_windows=1)
    assert len(evaluated) == 3 and evaluated.count(path) == 1  # float once, each quantized model once
    assert second.metrics["float"]["ppl"] == first.metrics["float"]["ppl"]
    assert first.metrics["accuracy_gate"] == {"max_ppl_increase_pct": 50, "passed": True}
    assert "accuracy_gate" not in second.metrics
    increase = first.metrics["ppl_increase_pct"]
    assert increase > 0  # int4 weights on a random model: a real loss
    with pytest.raises(qcompile.AccuracyGateError) as gate:  # the API's gate: the exception carries the measurement
        qcompile.compile(path, "ort-int4", tmp_path / "c", algo="rtn", lm_head_bits=8, eval_windows=1, max_ppl_increase=increase / 2)
    assert gate.value.exit_code == 3 and gate.value.metrics["ppl_increase_pct"] == increase
    assert not (tmp_path / "c").exists()
