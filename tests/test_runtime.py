"""Tests of nmcompile.runtime: provider configuration, session loading,
calibration table, sparse eligibility, bench and verify (CPU only, fast)."""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nmcompile.errors import UserError
from nmcompile.runtime.bench import (
    bench_models,
    bench_session,
    format_bench_table,
    input_specs,
    make_inputs,
)
from nmcompile.runtime.calib_table import (
    float_to_hex,
    hex_to_float,
    read_calibration_table,
    write_calibration_table,
)
from nmcompile.runtime.providers import (
    CPU,
    CUDA,
    TRT,
    baseline_config,
    config_path_for,
    provider_config,
    satisfies_trt_2_4,
    trt_precision,
    trt_sparse_eligibility,
)
from nmcompile.runtime.session import load, make_session_options, read_config, resolve_providers
from nmcompile.runtime.verify import compare_outputs, format_verify_table, verify_models

# ---------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------

K, C = 16, 10  # features, classes


def _save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(path))
    return os.fspath(path)


def _classifier(path, w, b):
    """x [N, K] -> MatMul W [K, C] -> Add b -> logits [N, C]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return _save(graph, path)


def _qdq_classifier(path, w, b):
    """The same classifier with an int8 Q/DQ pair on the weight and the input."""
    scale_w = np.float32(np.abs(w).max() / 127)
    wq = np.clip(np.round(w / scale_w), -127, 127).astype(np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"]),
        helper.make_node("MatMul", ["xd", "Wd"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(np.array(scale_w, np.float32), "sw"),
        numpy_helper.from_array(np.array(0, np.int8), "zw"),
        numpy_helper.from_array(np.array(4.0 / 127, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.int8), "zx"),
        numpy_helper.from_array(b, "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])],
        inits,
    )
    return _save(graph, path)


def _prune_2_4(w):
    """2:4 along the reduction axis K of a MatMul weight [K, N] (magnitude)."""
    g = w.reshape(K // 4, 4, -1).copy()
    drop = np.argsort(np.abs(g), axis=1)[:, :2]
    np.put_along_axis(g, drop, 0.0, axis=1)
    return g.reshape(w.shape)


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return rng.standard_normal((K, C)).astype(np.float32), rng.standard_normal(C).astype(np.float32)


@pytest.fixture()
def models(tmp_path, weights):
    w, b = weights
    original = _classifier(tmp_path / "model.onnx", w, b)
    compiled = _classifier(tmp_path / "model.nm.onnx", _prune_2_4(w), b)
    return original, compiled


def _write_cfg(model_path, cfg):
    path = config_path_for(model_path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return path


def _cfg(pattern=(2, 4), quantization=None, **kw):
    args = dict(pattern=pattern, sequential=False, transposable=False, quantization=quantization,
                model_filename="model.nm.onnx")
    args.update(kw)
    return provider_config(**args)


def _opts(cfg, name):
    return dict(next(o for n, o in cfg["providers"] if n == name))


# ---------------------------------------------------------------------------
# provider configuration
# ---------------------------------------------------------------------------


def test_config_2_4_fp16():
    cfg = _cfg((2, 4))
    assert [n for n, _ in cfg["providers"]] == [TRT, CUDA, CPU]
    trt = _opts(cfg, TRT)
    assert trt["trt_sparsity_enable"] is True
    assert trt["trt_fp16_enable"] is True
    assert trt["trt_int8_enable"] is False
    assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == "trt_cache" == trt["trt_timing_cache_path"]
    assert "trt_int8_calibration_table_name" not in trt
    assert cfg["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert cfg["model"] == "model.nm.onnx"
    assert any("2:4" in n and "trt_sparsity_enable is on" in n for n in cfg["notes"])


def test_config_4_8_no_sparsity_with_note():
    cfg = _cfg((4, 8))
    trt = _opts(cfg, TRT)
    assert trt["trt_sparsity_enable"] is False
    assert trt["trt_fp16_enable"] is True
    assert any("4:8" in n and "trt_sparsity_enable is off" in n for n in cfg["notes"])


def test_config_int8_qdq():
    cfg = _cfg((2, 4), "int8")
    trt = _opts(cfg, TRT)
    assert trt["trt_int8_enable"] is True
    assert trt["trt_sparsity_enable"] is True
    assert trt["trt_fp16_enable"] is True
    assert "trt_int8_calibration_table_name" not in trt  # explicit QDQ: no table
    assert cfg["compiled_with"]["trt_precision"] == "int8" == trt_precision("int8")
    assert any("QuantizeLinear" in n and "deprecated" in n for n in cfg["notes"])


def test_config_fp32_dense():
    cfg = _cfg(None, None)
    trt = _opts(cfg, TRT)
    assert trt["trt_sparsity_enable"] is False
    assert trt["trt_int8_enable"] is False
    assert trt["trt_fp16_enable"] is True
    assert cfg["compiled_with"]["pattern"] == "dense"


@pytest.mark.parametrize("quant", ["log", "lut"])
def test_config_weight_only_quantization(quant):
    cfg = _cfg((2, 4), quant)
    trt = _opts(cfg, TRT)
    assert trt["trt_int8_enable"] is False and trt["trt_fp16_enable"] is True
    assert any("weight-only" in n for n in cfg["notes"])


def test_config_transposable_and_sequential_notes():
    cfg = _cfg((2, 4), transposable=True, sequential=True)
    assert _opts(cfg, TRT)["trt_sparsity_enable"] is True
    assert any("Transposable" in n for n in cfg["notes"])
    assert any("Sequential" in n for n in cfg["notes"])


def test_config_deterministic_and_relative():
    a = json.dumps(_cfg((2, 4), "int8"), sort_keys=True)
    b = json.dumps(_cfg((2, 4), "int8"), sort_keys=True)
    assert a == b
    cfg = _cfg((2, 4), model_filename="/abs/dir/model.nm.onnx")
    assert cfg["model"] == "model.nm.onnx"
    for _, opts in cfg["providers"]:
        for v in opts.values():
            assert not (isinstance(v, str) and os.path.isabs(v))


def test_config_bad_arguments():
    with pytest.raises(UserError):
        _cfg((5, 4))
    with pytest.raises(UserError):
        _cfg((0, 4))
    with pytest.raises(UserError):
        _cfg((2, 4), "int4")
    with pytest.raises(UserError):
        _cfg((2, 4), cache_dir="../cache")
    with pytest.raises(UserError):
        _cfg((2, 4), cache_dir="/tmp/cache")
    with pytest.raises(UserError):
        _cfg((2, 4), "int8", calibration_table="calib.cache")


def test_config_legacy_calibration_table():
    cfg = _cfg((2, 4), None, calibration_table="calib.cache")
    trt = _opts(cfg, TRT)
    assert trt["trt_int8_enable"] is True
    assert trt["trt_int8_calibration_table_name"] == "calib.cache"
    assert trt["trt_int8_use_native_calibration_table"] is True


def test_satisfies_trt_rule():
    assert satisfies_trt_2_4((2, 4))
    assert satisfies_trt_2_4((1, 4)) and satisfies_trt_2_4((2, 8)) and satisfies_trt_2_4((1, 2))
    assert not satisfies_trt_2_4((4, 8))
    assert not satisfies_trt_2_4((3, 4))
    assert not satisfies_trt_2_4((2, 6))  # a group of 4 can straddle two groups of 6
    assert not satisfies_trt_2_4(None)


def test_baseline_config_strips_sparsity_and_caches():
    base = baseline_config(_cfg((2, 4), "int8"))
    trt = _opts(base, TRT)
    assert trt["trt_int8_enable"] is False and trt["trt_sparsity_enable"] is False
    assert trt["trt_fp16_enable"] is True
    assert "trt_engine_cache_path" not in trt and trt["trt_engine_cache_enable"] is False


@pytest.mark.parametrize("pattern,quant", [((2, 4), None), ((4, 8), None), ((2, 4), "int8"), (None, None)])
def test_config_builds_cpu_session(tmp_path, weights, caplog, pattern, quant):
    w, b = weights
    maker = _qdq_classifier if quant == "int8" else _classifier
    model = maker(tmp_path / "model.nm.onnx", w, b)
    cfg = _cfg(pattern, quant)
    _write_cfg(model, cfg)
    with caplog.at_level(logging.INFO, logger="nmcompile"):
        sess = load(model)
    assert sess.get_providers()[-1] == CPU
    missing = [n for n, _ in cfg["providers"] if n not in ort.get_available_providers()]
    assert set(missing) <= set(sess.nm_dropped_providers)
    for name in missing:
        assert name in caplog.text
    out = sess.run(None, {"x": np.ones((2, K), np.float32)})[0]
    assert out.shape == (2, C) and np.isfinite(out).all()
    # Plain onnxruntime accepts the options as written in the JSON file.
    with open(config_path_for(model), encoding="utf-8") as f:
        raw = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "provider not in available provider names"
        plain = ort.InferenceSession(model, providers=[(n, o) for n, o in raw["providers"]])
    assert CPU in plain.get_providers()


def test_resolve_providers_paths_relative_to_model(tmp_path):
    cfg = _cfg((2, 4))
    kept, dropped = resolve_providers(cfg, available=[TRT, CPU], model_dir=tmp_path / "sub")
    assert dropped == [CUDA]
    names = [n for n, _ in kept]
    assert names == [TRT, CPU]
    trt = kept[0][1]
    assert trt["trt_engine_cache_path"] == os.path.abspath(tmp_path / "sub" / "trt_cache")
    assert trt["trt_timing_cache_path"] == os.path.abspath(tmp_path / "sub" / "trt_cache")
    # the configuration itself is left untouched
    assert _opts(cfg, TRT)["trt_engine_cache_path"] == "trt_cache"
    kept, dropped = resolve_providers([TRT, CUDA], available=[CPU])
    assert kept == [(CPU, {})] and dropped == [TRT, CUDA]


def test_load_without_config_falls_back_to_cpu(models, caplog):
    _, compiled = models
    assert not os.path.exists(config_path_for(compiled))
    with caplog.at_level(logging.INFO, logger="nmcompile"):
        sess = load(compiled)
    assert sess.get_providers() == [CPU]
    assert "no provider configuration" in caplog.text


def test_load_errors(models, tmp_path):
    _, compiled = models
    with pytest.raises(UserError):
        load(tmp_path / "missing.onnx")
    with pytest.raises(UserError):
        load(compiled, tmp_path / "missing.ep.json")
    bad = tmp_path / "bad.ep.json"
    bad.write_text("{not json")
    with pytest.raises(UserError):
        load(compiled, bad)
    bad.write_text(json.dumps({"providers": []}))
    with pytest.raises(UserError):
        load(compiled, bad)
    with pytest.raises(UserError):
        load(compiled, no_such_option=3)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError):
        load(corrupt)


def test_session_options_applied(models):
    _, compiled = models
    so = make_session_options({"graph_optimization_level": "ORT_ENABLE_BASIC"}, intra_op_num_threads=2,
                              inter_op_num_threads=None)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.intra_op_num_threads == 2
    # unknown keys: skipped when they come from a configuration file, refused as overrides
    make_session_options({"from_a_newer_version": 1})
    with pytest.raises(UserError):
        make_session_options(None, from_a_newer_version=1)
    with pytest.raises(UserError):
        make_session_options({"graph_optimization_level": "ORT_ENABLE_EVERYTHING"})
    _write_cfg(compiled, _cfg((2, 4)))
    assert read_config(compiled)["providers"][0][0] == TRT
    sess = load(compiled, intra_op_num_threads=1, graph_optimization_level="ORT_DISABLE_ALL")
    assert sess.get_providers()[-1] == CPU


# ---------------------------------------------------------------------------
# calibration table
# ---------------------------------------------------------------------------


def test_calibration_table_uses_absolute_max(tmp_path):
    path = tmp_path / "calib.cache"
    scales = write_calibration_table({"b": (-10.0, 2.0), "a": (-0.5, 3.0), "zero": (0.0, 0.0)}, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert [ln.split(":")[0] for ln in lines[1:]] == ["a", "b", "zero"]  # sorted
    expected_b = float(np.float32(10.0 / 127))
    assert f"b: {float_to_hex(expected_b)}" in lines
    assert scales["b"] == pytest.approx(10.0 / 127, rel=1e-7)
    assert scales["a"] == pytest.approx(3.0 / 127, rel=1e-7)
    assert scales["zero"] > 0
    header, ranges = read_calibration_table(path)
    assert header.startswith("TRT-")
    assert ranges["b"] == pytest.approx(10.0, rel=1e-6)  # not 2 (ORT's max without abs)
    assert ranges["a"] == pytest.approx(3.0, rel=1e-6)
    assert float_to_hex(1.0) == "3f800000" and hex_to_float("3f800000") == 1.0


def test_calibration_table_skips_unwritable_names(tmp_path, caplog):
    path = tmp_path / "calib.cache"
    with caplog.at_level(logging.WARNING, logger="nmcompile"):
        scales = write_calibration_table({"input:0": (-1.0, 1.0), "ok": (-1.0, 1.0)}, path,
                                         trt_version=100100)
    assert list(scales) == ["ok"] and "input:0" in caplog.text
    assert path.read_text().splitlines()[0] == "TRT-100100-EntropyCalibration2"
    with pytest.raises(UserError):
        write_calibration_table({"x": (float("nan"), 1.0)}, tmp_path / "nan.cache")
    assert not (tmp_path / "nan.cache").exists()


# ---------------------------------------------------------------------------
# sparse eligibility
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op,out_c,in_c,kernel,pattern,precision,kw,expected,word",
    [
        ("Conv", 512, 512, (3, 3), (2, 4), "fp16", {}, True, "eligible"),
        ("Conv", 256, 256, (1, 1), (2, 4), "int8", {}, True, "eligible"),
        ("Conv", 64, 64, (3, 3), (2, 4), "fp16", {}, False, "too small"),  # K=64 < 256
        ("Conv", 256, 32, (3, 3), (2, 4), "fp16", {}, True, "taps"),  # 32*9 = 288 >= 256
        ("Conv", 128, 128, (1, 1), (2, 4), "fp16", {}, False, "too small"),
        ("Conv", 512, 512, (3, 3), (2, 4), "fp16", {"group": 2}, False, "grouped"),
        ("Conv", 512, 512, (3, 3), (2, 4), "fp32", {}, False, "fp16 or int8"),
        ("Conv", 512, 512, (3, 3), (4, 8), "fp16", {}, False, "2 zeros"),
        ("Conv", 512, 510, (3, 3), (2, 4), "fp16", {}, False, "multiple of 4"),
        ("MatMul", 768, 768, None, (2, 4), "fp16", {}, True, "eligible"),
        ("Gemm", 1024, 4096, None, (2, 4), "int8", {}, True, "eligible"),
        ("MatMul", 768, 768, None, (1, 4), "fp16", {}, True, "eligible"),
        ("MatMul", 768, 768, None, None, "fp16", {}, False, "dense"),
        ("MatMul", 10, 768, None, (2, 4), "fp16", {}, False, "too small"),
        ("Gather", 768, 768, None, (2, 4), "fp16", {}, False, "not a convolution"),
    ],
)
def test_trt_sparse_eligibility(op, out_c, in_c, kernel, pattern, precision, kw, expected, word):
    ok, reason = trt_sparse_eligibility(op, out_c, in_c, kernel, pattern, precision, **kw)
    assert ok is expected
    assert reason.startswith("eligible:" if expected else "not eligible:")
    assert word in reason


def test_eligibility_reason_names_its_source():
    _, reason = trt_sparse_eligibility("Conv", 512, 512, (3, 3), (2, 4), "fp16")
    assert "TensorRT" in reason and "#3849" in reason
    ok, _ = trt_sparse_eligibility("Conv", 300, 300, (1, 1), (2, 4), "fp16", min_channels=512)
    assert not ok


# ---------------------------------------------------------------------------
# inputs and bench
# ---------------------------------------------------------------------------


def test_make_inputs_generated(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["o1"]), helper.make_node("Identity", ["attention_mask"], ["o2"]),
         helper.make_node("Identity", ["img"], ["o3"])],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq_len"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq_len"]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, "foo"]),
        ],
        [
            helper.make_tensor_value_info("o1", TensorProto.INT64, ["batch", "seq_len"]),
            helper.make_tensor_value_info("o2", TensorProto.INT64, ["batch", "seq_len"]),
            helper.make_tensor_value_info("o3", TensorProto.FLOAT, ["n", 3, "foo"]),
        ],
    )
    path = _save(graph, tmp_path / "m.onnx")
    feed = make_inputs(path, 4, None, seed=0)
    assert feed["ids"].shape == (4, 128) and feed["ids"].dtype == np.int64
    assert (feed["attention_mask"] == 1).all()
    assert feed["img"].shape == (4, 3, 1) and feed["img"].dtype == np.float32
    again = make_inputs(path, 4, None, seed=0)
    assert all(np.array_equal(feed[k], again[k]) for k in feed)
    assert make_inputs(path, 2, None, dim_overrides={"seq_len": 7})["ids"].shape == (2, 7)
    assert [s[0] for s in input_specs(path)] == ["ids", "attention_mask", "img"]


def test_make_inputs_from_calibration(models):
    _, compiled = models
    data = {"x": np.arange(3 * K, dtype=np.float64).reshape(3, K), "label": np.zeros(3)}
    feed = make_inputs(compiled, 5, data)
    assert feed["x"].shape == (5, K) and feed["x"].dtype == np.float32
    assert np.array_equal(feed["x"][3], data["x"][0])  # repeated when too few samples
    assert make_inputs(compiled, 2, data)["x"].shape == (2, K)  # sliced
    with pytest.raises(UserError):
        make_inputs(compiled, 2, {"y": np.zeros((3, K))})
    with pytest.raises(UserError):
        make_inputs(compiled, 2, {"x": np.zeros((3, K + 1))})
    with pytest.raises(UserError):
        make_inputs(compiled, 2, {"x": np.zeros((3, 2, K))})
    with pytest.raises(UserError):
        make_inputs(compiled, 2, {"x": np.zeros((3, K), dtype=np.int64)})


def test_bench_session_numbers(models):
    _, compiled = models
    sess = load(compiled)
    res = bench_session(sess, make_inputs(compiled, 4), warmup=2, iterations=30)
    assert res["iterations"] == 30 and res["batch_size"] == 4
    assert 0 < res["min_ms"] <= res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
    assert res["throughput"] == pytest.approx(4 * 1000 / res["mean_ms"])


def test_bench_models_with_baseline(models):
    original, compiled = models
    _write_cfg(compiled, _cfg((2, 4)))
    rows = bench_models(compiled, original, batch_sizes=(1, 8), threads=1, warmup=2, iterations=20)
    assert [(r["model"], r["batch_size"]) for r in rows] == [
        ("compiled", 1), ("baseline", 1), ("compiled", 8), ("baseline", 8)]
    for r in rows:
        assert r["iterations"] == 20 and r["p50_ms"] > 0 and r["throughput"] > 0
        assert r["providers"][-1] == CPU
    comp = rows[0]
    assert comp["ratio_p50"] == pytest.approx(comp["p50_ms"] / rows[1]["p50_ms"])
    table = format_bench_table(rows)
    assert "compiled" in table and "baseline" in table and "x" in table and "p50 ratio" in table


def test_bench_models_alone_with_calibration(models):
    _, compiled = models
    data = {"x": np.random.default_rng(1).standard_normal((6, K)).astype(np.float32)}
    rows = bench_models(compiled, batch_sizes=(3,), warmup=1, iterations=5, calib_data=data)
    assert len(rows) == 1 and rows[0]["batch_size"] == 3 and "ratio_p50" not in rows[0]
    assert "ratio" not in format_bench_table(rows).splitlines()[-1]


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


def test_compare_outputs_known_values():
    ref = [{"logits": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)}]
    same = compare_outputs(ref, ref)["logits"]
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs"] == 0 and same["top1"] == 1.0
    neg = compare_outputs(ref, [{"logits": -ref[0]["logits"]}])["logits"]
    assert neg["cosine"] == pytest.approx(-1.0) and neg["top1"] == 0.0
    off = ref[0]["logits"].copy()
    off[0, 0] += 0.5
    m = compare_outputs(ref, [{"logits": off}])["logits"]
    assert m["max_abs"] == pytest.approx(0.5) and m["mean_abs"] == pytest.approx(0.5 / 6)
    assert m["top1"] == 1.0 and 0.99 < m["cosine"] < 1.0
    nan = compare_outputs(ref, [{"logits": np.full_like(off, np.nan)}])["logits"]
    assert np.isnan(nan["max_abs"]) and nan["nonfinite"] == 6  # not the 0.0 that max(0.0, nan) gives
    # not logits: 1-D, or a single column; integer outputs get "exact"
    vec = compare_outputs({"v": np.ones(4)}, {"v": np.ones(4)})["v"]
    assert vec["top1"] is None and vec["worst_sample_cosine"] is None
    ints = compare_outputs({"i": np.array([1, 2, 3])}, {"i": np.array([1, 2, 4])})["i"]
    assert ints["exact"] == pytest.approx(2 / 3) and ints["cosine"] is None
    with pytest.raises(UserError):
        compare_outputs({"a": np.ones((2, 3))}, {"a": np.ones((3, 2))})
    with pytest.raises(UserError):
        compare_outputs({"a": np.ones(2)}, {"b": np.ones(2)})


def test_compare_outputs_streams_batches():
    rng = np.random.default_rng(0)
    a = [rng.standard_normal((4, 5)) for _ in range(3)]
    b = [x + 0.01 * rng.standard_normal(x.shape) for x in a]
    m = compare_outputs([{"y": x} for x in a], [{"y": x} for x in b])["y"]
    whole_a, whole_b = np.concatenate(a).ravel(), np.concatenate(b).ravel()
    cos = whole_a @ whole_b / np.linalg.norm(whole_a) / np.linalg.norm(whole_b)
    assert m["cosine"] == pytest.approx(cos)
    assert m["max_abs"] == pytest.approx(np.abs(whole_a - whole_b).max())
    assert m["samples"] == 12 and m["worst_sample_cosine"] <= m["cosine"] + 1e-9


def test_verify_models(models):
    original, compiled = models
    _write_cfg(compiled, _cfg((2, 4)))
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((8, K)).astype(np.float32)} for _ in range(3)]
    same = verify_models(original, original, batches)
    m = same["outputs"]["logits"]
    assert m["cosine"] == pytest.approx(1.0) and m["max_abs"] == 0.0 and m["top1"] == 1.0
    res = verify_models(original, compiled, batches)
    assert res["batches"] == 3 and res["samples"] == 24 and res["inputs"] == "data"
    m = res["outputs"]["logits"]
    assert 0.3 < m["cosine"] < 1.0  # pruning half the weights changes the output
    assert m["max_abs"] > 0 and 0 <= m["top1"] <= 1 and m["shape"] == [8, C]
    assert res["providers"]["compiled"][-1] == CPU
    assert set(res["dropped_providers"]) == {n for n in (TRT, CUDA) if n not in ort.get_available_providers()}
    table = format_verify_table(res)
    assert "logits" in table and "cosine" in table and "%" in table
    rnd = verify_models(original, compiled, None, random_batches=2, batch_size=4)
    assert rnd["inputs"] == "random" and rnd["samples"] == 8


def test_verify_reuses_sessions(models):
    original, compiled = models
    sess = load(compiled)
    res = verify_models(original, compiled, [{"x": np.ones((2, K), np.float32)}], compiled_session=sess)
    assert res["outputs"]["logits"]["samples"] == 2


def test_a_guessed_dimension_is_told_once(caplog):
    import logging

    from nmcompile.runtime import bench

    with caplog.at_level(logging.INFO, logger="nmcompile"):
        dims = [bench._concrete_dims("told_once_input", ["N", "S"], 4, None) for _ in range(3)]  # one per verify batch
    assert dims[0][0] == 4 and dims[0] == dims[1] == dims[2]
    told = [r for r in caplog.records if "told_once_input" in r.getMessage()]
    assert len(told) == 1
