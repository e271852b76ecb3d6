"""Recipes: one resolution order, files that round-trip, errors that name the field, and a manifest that
rebuilds its artifact."""

from __future__ import annotations

import json
import tomllib

import pytest

from qcompile import errors
from qcompile.cli import main
from qcompile.recipe import INT4_CLIP, LM_HEAD_SAMPLES, NormRotation, resolve, to_dict, to_toml
from qcompile.schemes import Algorithm


def test_target_defaults_then_file_then_options():
    assert resolve("ort-int4").lm_head.bits == 4 and resolve("trt-int4").weights.positive_scales
    file = {"weights": {"algorithm": "gptq", "group_size": 64}, "lm_head": {"bits": "float"}}
    plan = resolve("ort-int4", file, {"group_size": 32})
    assert plan.weights.algorithm == Algorithm.GPTQ  # from the file
    assert plan.weights.group_size == 32  # the option wins over the file
    assert plan.lm_head.bits is None  # "float" in a file is None
    assert plan.weights.bits == 4  # the target's default, untouched
    assert resolve(None, {"target": "trt-int8"}).target == "trt-int8"  # a file may name the target
    assert resolve("ort-int4", {"target": "trt-int8"}).target == "ort-int4"  # an explicit target wins


def test_defaults_that_follow_from_other_choices():
    w4a4 = resolve("ort-int4", None, {"activations": "int4-dynamic", "rotate": True})
    assert w4a4.activations.clip == INT4_CLIP and w4a4.rotation.norm_outputs == NormRotation.SMOOTHED
    assert w4a4.rotation.attention_hadamards
    assert resolve("ort-int4", None, {"activations": "int4-dynamic", "activation_clip": 1.0}).activations.clip == 1.0
    assert resolve("ort-w4a8").rotation.norm_outputs == NormRotation.RESIDUAL
    assert not resolve("ort-w4a8").rotation.attention_hadamards
    assert resolve("ort-w4a8", None, {"kv_cache_bits": 4}).rotation.attention_hadamards
    assert resolve("ort-int4").calibration.samples == 16  # the target's default is a choice: nothing derives over it
    assert resolve("ort-w8a8", None, {"lm_head_bits": 4, "smoothquant": False}).calibration.samples == LM_HEAD_SAMPLES  # only lm_head
    assert resolve("ort-w4a8").calibration.samples == 128  # GPTQ


@pytest.mark.parametrize("target", ["ort-int4", "trt-int4", "edge-int4", "ort-w8a8", "ort-w4a8", "trt-int8", "trt-fp8"])
def test_toml_and_json_round_trip(target):
    plan = resolve(target, None, {"alpha": None, "skip": ["blocks.0.down"], "calib": "my text.txt", "kv_cache_bits": 8})
    assert resolve(None, tomllib.loads(to_toml(plan))) == plan
    assert resolve(None, json.loads(json.dumps(to_dict(plan)))) == plan


@pytest.mark.parametrize("recipe,overrides,message", [
    ({"weights": {"bitz": 4}}, {}, "unknown field weights.bitz"),
    ({"weigths": {}}, {}, "unknown recipe section [weigths]"),
    ({"weights": {"bits": "4"}}, {}, "weights.bits must be an integer"),
    ({"weights": {"symmetric": 1}}, {}, "weights.symmetric must be true or false"),
    ({"version": 2}, {}, "recipe version 2"),
    (None, {"algo": "hqq"}, "unknown algorithm 'hqq'"),
    (None, {"bits": 3}, "bits=3 is not supported"),
    (None, {"rotation": "smoothed"}, "add --rotate"),
    (None, {"attention_hadamards": True}, "add --rotate"),
    (None, {"accuracy_level": 7}, "accuracy level 7"),
    (None, {"kv_cache_bits": 2}, "KV-cache bits=2"),
    (None, {"bitz": 4}, "unknown option(s) bitz"),
])
def test_bad_recipes_name_the_field_and_the_fix(recipe, overrides, message):
    with pytest.raises(errors.InputError, match=None) as e:
        resolve("ort-int4", recipe, overrides)
    assert message in str(e.value)


def test_targets_refuse_what_their_runtime_cannot_run():
    with pytest.raises(errors.InputError, match="positive scales"):
        resolve("trt-int4", None, {"positive_scales": False})
    with pytest.raises(errors.InputError, match="static per tensor"):
        resolve("trt-int8", None, {"activations": "int8-dynamic"})

    # the canonical 4-bit default is one recipe for all three targets, which TensorRT's runtime accepts
    assert len({str(to_dict(resolve(t))).replace(t, "") for t in ("ort-int4", "trt-int4", "edge-int4")}) == 1


def test_bad_recipe_files(tmp_path):
    (tmp_path / "bad.toml").write_text("[weights\nbits = 4")
    with pytest.raises(errors.InputError, match="not valid TOML"):
        resolve(None, tmp_path / "bad.toml")
    with pytest.raises(errors.SourceNotFoundError):
        resolve(None, tmp_path / "missing.toml")


def test_recipe_command_prints_toml_that_model_accepts(capsys, tmp_path):
    assert main(["recipe", "--target", "ort-int4", "--algo", "gptq", "--lm-head", "int8"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "r.toml").write_text(text)
    plan = resolve(None, tmp_path / "r.toml")
    assert plan == resolve("ort-int4", None, {"algo": "gptq", "lm_head_bits": 8})
    assert main(["recipe", "--recipe", str(tmp_path / "r.toml"), "--bits", "8", "--group-size", "0"]) == 0
    assert resolve(None, tomllib.loads(capsys.readouterr().out)).weights.bits == 8


def test_manifest_recipe_rebuilds_the_artifact_byte_for_byte(tiny_export, tmp_path):
    """A calibrated recipe with non-default options, rebuilt from the manifest alone (no --target, no options)."""
    _, path = tiny_export("qwen2")
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([str(path), "-t", "ort-int4", "-o", str(first), "--no-eval", "--algo", "awq", "--group-size", "32",
                 "--calib-samples", "4", "--calib-seqlen", "64", "--embeddings", "int8"]) == 0
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["recipe"]["weights"]["algorithm"] == "awq" and manifest["recipe"]["target"] == "ort-int4"
    assert main([str(path), "--recipe", str(first / "manifest.json"), "-o", str(second), "--no-eval"]) == 0
    for name in ("model.onnx", "model.onnx.data"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert json.loads((second / "manifest.json").read_text())["recipe"] == manifest["recipe"]


@pytest.mark.parametrize("target,options,served", [
    ("trt-int8", [], ["FoldSmoothQuantScales", "QuantizeActivations"]),
    ("ort-int4", ["--algo", "awq"], ["QuantizeWeightsGPTQ", "QuantizeWeightsAWQ"]),  # the 4-bit lm_head and AWQ share it
])
def test_one_calibration_run_serves_every_pass_that_needs_the_float_model(tiny_export, tmp_path, target, options, served):
    _, path = tiny_export("qwen2")
    out = tmp_path / "art"
    assert main([str(path), "-t", target, "-o", str(out), "--no-eval", "--calib-samples", "4", "--calib-seqlen", "64",
                 *options]) == 0
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    runs = [p for p in passes if p["name"] == "Calibrate"]
    assert len(runs) == 1 and runs[0]["for"] == served and runs[0]["windows"] == 4
