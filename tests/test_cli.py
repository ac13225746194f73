"""The command line: bad input gets one line and exit 2, nothing written; outputs are deterministic."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from nmcompile import modelzoo as zoo


def listing(folder):
    return sorted(p.name for p in folder.rglob("*"))


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(zoo.matmul_model(), str(path))
    return path


def assert_bad_input(run_cli, folder, *args, expect=None):
    before = listing(folder)
    code, out, err = run_cli(*args)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nmcompile: error:"), err
    assert "Traceback" not in err
    if expect:
        assert expect in err
    assert listing(folder) == before
    return err


def test_compile_default_output(run_cli, model_path):
    code, out, err = run_cli(model_path)
    assert code == 0, err
    folder = model_path.parent
    assert {"m.nm.onnx", "m.nm.report.json", "m.nm.ep.json"} <= set(listing(folder))
    assert "mm1" in out and "2:4" in out


def test_missing_file(run_cli, tmp_path):
    assert_bad_input(run_cli, tmp_path, tmp_path / "nope.onnx", expect="no such file")


def test_empty_file(run_cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_bad_input(run_cli, tmp_path, tmp_path / "empty.onnx", expect="empty")


def test_not_onnx(run_cli, tmp_path):
    (tmp_path / "text.onnx").write_text("this is not a model\n" * 10)
    assert_bad_input(run_cli, tmp_path, tmp_path / "text.onnx")


def test_random_bytes(run_cli, tmp_path):
    (tmp_path / "rand.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_bad_input(run_cli, tmp_path, tmp_path / "rand.onnx")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated(run_cli, tmp_path, model_path, fraction):
    data = model_path.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: int(len(data) * fraction)])
    assert_bad_input(run_cli, tmp_path, bad)


def test_folder_as_model(run_cli, tmp_path):
    assert_bad_input(run_cli, tmp_path, tmp_path)


@pytest.mark.parametrize("pattern", ["5:4", "0:4", "4:4", "x", "2:4:8", "-2:4", "2:64"])
def test_bad_pattern(run_cli, model_path, pattern):
    assert_bad_input(run_cli, model_path.parent, model_path, "--pattern", pattern, expect="pattern")


def test_output_equal_to_input(run_cli, model_path):
    before = model_path.read_bytes()
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", model_path, expect="overwrite")
    assert model_path.read_bytes() == before


def test_output_equal_to_input_through_other_spelling(run_cli, model_path):
    other = model_path.parent / "." / model_path.name
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", other, expect="overwrite")


def test_output_folder_missing(run_cli, model_path):
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", model_path.parent / "no" / "out.onnx", expect="does not exist")


def test_output_folder_not_writable(run_cli, model_path, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/nmcompile-out.onnx"  # root can write anywhere but here
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out.onnx"
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", target)


def test_unknown_option(run_cli, model_path):
    assert_bad_input(run_cli, model_path.parent, model_path, "--frobnicate")


def test_no_arguments(run_cli, tmp_path):
    assert_bad_input(run_cli, tmp_path)


def _external_model(tmp_path):
    path = tmp_path / "ext.onnx"
    zoo.save_with_external_data(zoo.matmul_model(k=128, n=64), path)
    return path


def _rewrite_locations(path, location):
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))


def test_external_absolute_location(run_cli, tmp_path):
    path = _external_model(tmp_path)
    _rewrite_locations(path, str(tmp_path / "ext.onnx.data"))
    assert_bad_input(run_cli, tmp_path, path, expect="absolute")


def test_external_dotdot_location(run_cli, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _external_model(sub)
    os.replace(sub / "ext.onnx.data", tmp_path / "ext.onnx.data")
    _rewrite_locations(path, "../ext.onnx.data")
    assert_bad_input(run_cli, tmp_path, path, expect="leaves")


def test_external_symlink_location(run_cli, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _external_model(sub)
    os.replace(sub / "ext.onnx.data", tmp_path / "real.data")
    os.symlink(tmp_path / "real.data", sub / "ext.onnx.data")
    assert_bad_input(run_cli, tmp_path, path, expect="symbolic link")


def test_external_symlinked_folder(run_cli, tmp_path):
    sub = tmp_path / "sub"
    (tmp_path / "elsewhere").mkdir()
    sub.mkdir()
    path = _external_model(sub)
    os.replace(sub / "ext.onnx.data", tmp_path / "elsewhere" / "w.data")
    os.symlink(tmp_path / "elsewhere", sub / "d")
    _rewrite_locations(path, "d/w.data")
    assert_bad_input(run_cli, tmp_path, path, expect="symbolic link")


def test_external_data_missing(run_cli, tmp_path):
    path = _external_model(tmp_path)
    (tmp_path / "ext.onnx.data").unlink()
    assert_bad_input(run_cli, tmp_path, path, expect="not found")


def test_external_data_truncated(run_cli, tmp_path):
    path = _external_model(tmp_path)
    data = (tmp_path / "ext.onnx.data").read_bytes()
    (tmp_path / "ext.onnx.data").write_bytes(data[: len(data) // 2])
    assert_bad_input(run_cli, tmp_path, path)


def test_deterministic_bytes(run_cli, tmp_path):
    model = zoo.conv_model(bn=True)
    outs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        onnx.save(model, str(folder / "m.onnx"))
        code, _, err = run_cli(folder / "m.onnx", "--pattern", "4:8")
        assert code == 0, err
        outs.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert outs[0][key] == outs[1][key], key


def test_internal_error_is_short_unless_debug(run_cli, model_path, monkeypatch):
    import nmcompile.pipeline as pipeline

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pipeline, "compile_model", boom)
    code, _, err = run_cli(model_path)
    assert code == 1 and "kaboom" in err and "Traceback" not in err
    code, _, err = run_cli(model_path, "--debug")
    assert code == 1 and "Traceback" in err


def test_console_script_exit_codes(tmp_path, model_path):
    """The installed `nmcompile` command itself (a subprocess), as a user runs it."""
    ok = subprocess.run([sys.executable, "-m", "nmcompile", str(model_path), "-o", str(tmp_path / "o.onnx"), "-q"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "nmcompile", str(model_path), "--pattern", "0:4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_inspect_table_and_diversity(run_cli, model_path):
    code, out, err = run_cli("inspect", model_path)
    assert code == 0, err
    assert "mm1" in out and "2.82e+12" in out and "6.56e+07" in out
    run_cli(model_path, "--pattern", "2:4")
    code, out, _ = run_cli("inspect", model_path.parent / "m.nm.onnx", "--json")
    import json

    result = json.loads(out)
    layer = {l["name"]: l for l in result["layers"]}["mm1"]
    assert layer["smallest_n"]["4"] == 2 and layer["smallest_n"]["8"] <= 4
    assert abs(layer["sparsity"] - 0.5) < 1e-9
    diversity = {d["pattern"]: d["masks_per_64_weights"] for d in result["mask_diversity"]}
    assert diversity == {"unstructured 50%": 1832624140942590534, "4:8": 70**8, "2:4": 6**16, "4:8-T": 116963796250, "2:4-T": 90**4}


def test_inspect_bad_input(run_cli, tmp_path):
    assert_bad_input(run_cli, tmp_path, "inspect", tmp_path / "missing.onnx")


def test_verify_and_bench_on_shipped_model(run_cli, tmp_path):
    from conftest import MODELS

    src = tmp_path / "digits_cnn.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    code, _, err = run_cli(src, "--calib", MODELS / "digits_calib.npz", "-q")
    assert code == 0, err
    compiled = tmp_path / "digits_cnn.nm.onnx"
    # the test file carries labels too: both models are scored against them
    code, out, err = run_cli("verify", src, compiled, "--calib", MODELS / "digits_test.npz", "--json")
    assert code == 0, err
    import json
    import sys

    sys.path.insert(0, str(MODELS))
    from evaluate import accuracy

    logits = json.loads(out)["outputs"]["logits"]
    assert logits["cosine"] > 0.95 and logits["top1"] > 0.95
    assert logits["accuracy"]["samples"] == 360
    assert logits["accuracy"]["original"] == accuracy(str(src), str(MODELS / "digits_test.npz"))
    assert logits["accuracy"]["compiled"] == accuracy(str(compiled), str(MODELS / "digits_test.npz"))
    code, out, err = run_cli("verify", src, compiled, "--calib", MODELS / "digits_test.npz")
    assert code == 0 and "accuracy against the data's labels (logits, 360 samples)" in out
    test = np.load(MODELS / "digits_test.npz")
    np.savez(tmp_path / "inputs.npz", input=test["input"])
    code, out, err = run_cli("verify", src, compiled, "--calib", tmp_path / "inputs.npz", "--json")
    assert code == 0, err
    assert "accuracy" not in json.loads(out)["outputs"]["logits"]
    # labels that cannot be one class index per sample, and other unknown arrays, are refused
    np.savez(tmp_path / "short.npz", input=test["input"], labels=test["labels"][:-1])
    np.savez(tmp_path / "float.npz", input=test["input"], labels=test["labels"].astype(np.float32))
    np.savez(tmp_path / "other.npz", input=test["input"], targets=test["labels"])
    for bad, expect in (("short.npz", "359 labels for 360 samples"), ("float.npz", "1-D integers"), ("other.npz", "targets")):
        assert_bad_input(run_cli, tmp_path, "verify", src, compiled, "--calib", tmp_path / bad, expect=expect)
    code, out, err = run_cli("bench", compiled, "--baseline", src, "--iterations", "5", "--warmup", "1", "--batch-sizes", "1,4")
    assert code == 0, err
    assert "baseline" in out and "compiled" in out
    # the test file's labels are verify's: compile and bench take the same file and leave them out
    code, out, err = run_cli("bench", compiled, "--calib", MODELS / "digits_test.npz", "--iterations", "2", "--warmup", "0")
    assert code == 0, err
    code, _, err = run_cli(src, "--calib", MODELS / "digits_test.npz", "-o", tmp_path / "t.onnx", "-q")
    assert code == 0, err
    # a baseline that is not the model's original: one line, exit 2
    other = tmp_path / "enc.onnx"
    other.write_bytes((MODELS / "digits_encoder.onnx").read_bytes())
    assert_bad_input(run_cli, tmp_path, "bench", compiled, "--baseline", other, "--iterations", "2",
                     expect="--baseline is the original of the model being timed")


def test_verify_bench_bad_input(run_cli, tmp_path, model_path):
    assert_bad_input(run_cli, tmp_path, "verify", model_path, tmp_path / "missing.onnx")
    assert_bad_input(run_cli, tmp_path, "bench", tmp_path / "missing.onnx")
    assert_bad_input(run_cli, tmp_path, "bench", model_path, "--batch-sizes", "0")


def test_lut_opt_outs_keep_tables_and_parameters_float(run_cli, tmp_path):
    import json

    src = tmp_path / "b.onnx"
    onnx.save(zoo.bert_encoder(), str(src))
    reports = {}
    for tag, flags in (("default", ()), ("float", ("--no-float16-params", "--no-code-tables"))):
        code, _, err = run_cli(src, "--pattern", "none", "--quantize", "lut", "-o", tmp_path / f"{tag}.onnx", *flags)
        assert code == 0, err
        reports[tag] = json.loads((tmp_path / f"{tag}.report.json").read_text())["quantization"]
    assert len(reports["default"]["tables"]) == 1 and reports["default"]["float16_parameters"]["tensors"] > 0
    assert not reports["float"]["tables"] and reports["float"]["float16_parameters"] is None
    assert (tmp_path / "float.onnx").stat().st_size > (tmp_path / "default.onnx").stat().st_size


def test_calibration_data_the_model_cannot_run(run_cli, tmp_path):
    # token ids beyond the embedding table fail inside ONNX Runtime: one line, exit 2
    src = tmp_path / "b.onnx"
    onnx.save(zoo.bert_encoder(layers=1, hidden=32, heads=2, vocab=64, seq=8), str(src))
    np.savez(tmp_path / "c.npz", input_ids=np.full((4, 8), 10**6, np.int64))
    assert_bad_input(run_cli, tmp_path, src, "--calib", tmp_path / "c.npz", expect="could not run the model on the calibration data")


def test_a_coded_model_cannot_be_compiled_again(run_cli, tmp_path):
    import json

    from conftest import MODELS

    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    code, _, err = run_cli(src, "--pattern", "none", "--quantize", "lut", "--bits", "4", "-o", tmp_path / "lut.onnx", "-q")
    assert code == 0, err
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(tmp_path / "lut.onnx", "--pattern", "2:4", "-o", tmp_path / "again.onnx", "-q")
    assert code == 2 and err.count("\n") == 1 and "coded by an earlier nmcompile --quantize log/lut" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # --sensitivity measures on data: without --calib it is refused, like --max-error
    code, _, err = run_cli(src, "--quantize", "lut", "--sensitivity", "-o", tmp_path / "s.onnx")
    assert code == 2 and "--sensitivity needs --calib" in err
    # nothing pruned (every layer excluded): the configuration does not ask TensorRT for sparse kernels
    code, _, err = run_cli(src, "--pattern", "2:4", "--exclude", "*", "-o", tmp_path / "dense.onnx", "-q")
    assert code == 0, err
    ep = json.loads((tmp_path / "dense.ep.json").read_text())
    assert ep["providers"][0][1]["trt_sparsity_enable"] is False


@pytest.mark.parametrize("args, flag", [
    (["--quantize", "int8", "--calib", "C", "--bits", "4"], "--bits"),
    (["--bits", "4"], "--bits"),
    (["--quantize", "lut", "--calib-method", "kl"], "--calib-method"),
    (["--quantize", "log", "--weight-rounding", "gptq"], "--weight-rounding"),
    (["--quantize", "int8", "--calib", "C", "--no-float16-params"], "--no-float16-params"),
    (["--no-code-tables"], "--no-code-tables"),
    (["--solver", "exact"], "--solver"),
    (["--no-adaprune"], "--no-adaprune"),
    (["--stats-budget", "8"], "--stats-budget"),
    (["--pattern", "none", "--permute"], "--permute"),
    (["--pattern", "none", "--transposable"], "--transposable"),
    (["--pattern", "none", "--quantize", "int8", "--calib", "C", "--mask-score", "obs"], "--mask-score"),
])
def test_options_that_would_change_nothing_are_refused(run_cli, tmp_path, args, flag):
    from conftest import MODELS

    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    calib = str(MODELS / "digits_calib.npz")
    args = [calib if a == "C" else a for a in args]
    assert_bad_input(run_cli, tmp_path, src, *args, expect=f"{flag} would change nothing here")


def test_options_that_apply_are_accepted(run_cli, tmp_path):
    from conftest import MODELS

    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    for i, args in enumerate((["--quantize", "lut", "--bits", "3", "--no-code-tables"],
                              ["--pattern", "none", "--quantize", "int8", "--calib", str(MODELS / "digits_calib.npz"),
                               "--calib-method", "kl", "--weight-rounding", "nearest"],
                              ["--transposable", "--solver", "approx"])):
        code, _, err = run_cli(src, *args, "-q", "-o", tmp_path / f"o{i}.onnx")
        assert code == 0, err


def test_outputs_never_overwrite_the_calibration_data(run_cli, tmp_path):
    from conftest import MODELS

    src = tmp_path / "m.onnx"
    src.write_bytes((MODELS / "digits_cnn.onnx").read_bytes())
    calib = tmp_path / "c.npz"
    calib.write_bytes((MODELS / "digits_calib.npz").read_bytes())
    before = calib.read_bytes()
    assert_bad_input(run_cli, tmp_path, src, "--calib", calib, "-o", calib, expect="would overwrite an input")
    # a side file of the output (OUT.report.json) that is the calibration data
    side = tmp_path / "w.report.json"
    side.write_bytes(before)
    assert_bad_input(run_cli, tmp_path, src, "--calib", side, "-o", tmp_path / "w.onnx", expect="would overwrite an input")
    # a file inside a calibration folder
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.npz").write_bytes(before)
    assert_bad_input(run_cli, tmp_path, src, "--calib", folder, "-o", folder / "a.npz", expect="would overwrite an input")
    assert calib.read_bytes() == before and (folder / "a.npz").read_bytes() == before


def test_output_that_is_a_folder_or_empty(run_cli, model_path):
    (model_path.parent / "sub").mkdir()
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", model_path.parent / "sub", expect="is a folder")
    (model_path.parent / "o.report.json").mkdir()  # a side file's name taken by a folder
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", model_path.parent / "o.onnx", expect="is a folder")
    assert_bad_input(run_cli, model_path.parent, model_path, "-o", "", expect="-o needs a file name")


def test_commit_is_all_or_nothing(tmp_path):
    from nmcompile.graphio import AtomicWriter

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").mkdir()  # the third rename fails after two succeeded
    with pytest.raises(IsADirectoryError):
        with AtomicWriter() as w:
            w.write_bytes(tmp_path / "a.txt", b"new a")
            w.write_bytes(tmp_path / "b.txt", b"new b")
            w.write_bytes(tmp_path / "c.txt", b"new c")
    assert listing(tmp_path) == ["a.txt", "c.txt"]  # no temporaries, no b.txt
    assert (tmp_path / "a.txt").read_text() == "old a"  # the replaced file is back
    with AtomicWriter() as w:
        w.write_bytes(tmp_path / "a.txt", b"new a")
        w.write_bytes(tmp_path / "b.txt", b"new b")
    assert listing(tmp_path) == ["a.txt", "b.txt", "c.txt"] and (tmp_path / "a.txt").read_text() == "new a"


def test_sigterm_while_writing_leaves_no_files(run_cli, model_path, monkeypatch):
    import signal

    from nmcompile import graphio

    real = graphio.write_streamed

    def stopped_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what `docker stop` / systemd send
        return real(*args, **kwargs)

    monkeypatch.setattr(graphio, "write_streamed", stopped_midway)
    before = listing(model_path.parent)
    handler = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(model_path, "-o", model_path.parent / "out.onnx", "-q")
    assert code == 128 + signal.SIGTERM and "terminated" in err
    assert listing(model_path.parent) == before
    assert signal.getsignal(signal.SIGTERM) is handler  # main() puts the previous handler back


def test_pattern_none_on_a_pruned_model_keeps_tensorrt_sparsity(run_cli, tmp_path):
    import json

    onnx.save(zoo.resnet50(width=0.5, image=32, classes=10), str(tmp_path / "r.onnx"))
    code, _, err = run_cli(tmp_path / "r.onnx", "-o", tmp_path / "r24.onnx", "-q")
    assert code == 0, err
    for src, expect in (("r24.onnx", True), ("r.onnx", False)):  # pruned before / dense
        out = tmp_path / f"{src}.again.onnx"
        code, _, err = run_cli(tmp_path / src, "--pattern", "none", "-o", out, "-q")
        assert code == 0, err
        ep = json.loads(out.with_name(out.name[:-5] + ".ep.json").read_text())
        report = json.loads(out.with_name(out.name[:-5] + ".report.json").read_text())
        assert ep["providers"][0][1]["trt_sparsity_enable"] is expect
        assert ep["compiled_with"]["pattern"] == ("2:4" if expect else "dense")
        eligible = [row for row in report["layers"] if row["trt_sparse"]["eligible"]]
        assert bool(eligible) is expect
        assert all(row["existing_pattern"] == "2:4" for row in eligible)


def test_fixed_batch_reports_what_ran_and_what_was_left_out(run_cli, tmp_path):
    import json

    model = zoo.matmul_model(k=64, n=32)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a fixed batch of 4
    onnx.save(model, str(tmp_path / "m.onnx"))
    name = model.graph.input[0].name
    np.savez(tmp_path / "c.npz", **{name: np.random.default_rng(0).standard_normal((10, 5, 64)).astype(np.float32)})
    code, out, err = run_cli(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "--calib-batch", "7", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert report["options"]["calibration"]["batch"] == 4
    note = "2 of 10 calibration samples left out: the model takes batches of exactly 4"
    assert note in report["notes"] and f"note: {note}" in out


def test_a_model_onnxruntime_cannot_load_is_refused_under_calibration(run_cli, tmp_path):
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm1")], "g",
                              [vi("x", 1, ["N", 60])], [vi("y", 1, ["N", 32])],  # 60 inputs for a 64-row weight
                              [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 60)).astype(np.float32))
    # the layer reads the graph input straight from the data: its vectors are too short
    assert_bad_input(run_cli, tmp_path, src, "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.onnx",
                     expect="layer mm1: its input has 60 values per vector where its weight takes 64")
    assert_bad_input(run_cli, tmp_path, src, "--calib", tmp_path / "c.npz", "--sequential-calib", "-o", tmp_path / "o.onnx",
                     expect="layer mm1: its input has 60 values per vector where its weight takes 64")
    # ORT must load the model to compute layer inputs (or int8 ranges): it cannot
    model = zoo.matmul_model(k=64)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 60
    onnx.save(model, str(src))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((8, 5, 60)).astype(np.float32))
    for extra in ((), ("--pattern", "none", "--quantize", "int8")):
        assert_bad_input(run_cli, tmp_path, src, "--calib", tmp_path / "c.npz", *extra, "-o", tmp_path / "o.onnx",
                         expect="ONNX Runtime cannot load the model to calibrate it")
