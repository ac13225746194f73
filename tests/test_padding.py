"""Padded tokens (attention_mask 0) stay out of the calibration statistics."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nmcompile import modelzoo
from nmcompile.passes import statistics as st
from nmcompile.passes.adaprune import PADDING_NOTE
from nmcompile.pipeline import compile_model

LENGTHS = (5, 8, 3, 8, 1, 6)
SEQ = 8


def _padded(rng, lengths=LENGTHS, seq=SEQ, vocab=200):
    ids = rng.integers(1, vocab, size=(len(lengths), seq)).astype(np.int64)
    mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    return ids, mask


def _layer_specs(model):
    inits = {t.name for t in model.graph.initializer}
    return [st.LayerSpec(n.name, n.input[0], "dense", feature_axis=-1)
            for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_token_mask_reads_only_zero_one_masks():
    ids = np.ones((2, 4), np.int64)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert st.token_mask({"input_ids": ids}) is None
    np.testing.assert_array_equal(st.token_mask({"input_ids": ids, "attention_mask": mask}), mask == 1)
    np.testing.assert_array_equal(st.token_mask({"input_mask": mask.astype(np.float32)}), mask == 1)
    assert st.token_mask({"attention_mask": np.where(mask == 1, 0.0, -1e4)}) is None  # additive: not 0/1
    assert st.token_mask({"attention_mask": mask[None]}) is None  # not (batch, sequence)


def test_token_rows_only_where_the_rows_line_up():
    tokens = np.array([[True, False, True], [False, True, True]])
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_array_equal(st.token_rows(x, tokens), x.reshape(-1, 4)[[0, 2, 4, 5]])
    np.testing.assert_array_equal(st.token_rows(x.reshape(6, 4), tokens), x.reshape(-1, 4)[[0, 2, 4, 5]])
    other = np.ones((2, 5, 4), np.float32)  # a sequence axis of another length: every row counts
    assert st.token_rows(other, tokens).shape == (10, 4)
    assert st.token_rows(x, None).shape == (6, 4)


@pytest.mark.parametrize("sequential", [False, True])
def test_padded_batch_statistics_equal_the_unpadded_sequences(sequential):
    # With the mask, a real token's activations do not depend on the padding; the
    # statistics of one padded batch must equal those of each sequence fed alone at
    # its own length (no padding at all).
    model = modelzoo.bert_encoder(layers=1, hidden=32, heads=2, vocab=200, attention_mask=True, seed=3)
    specs = _layer_specs(model)
    ids, mask = _padded(np.random.default_rng(0))
    alone = [{"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]} for i, n in enumerate(LENGTHS)]
    if sequential:
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        weights = {s.name: [inits[next(n for n in model.graph.node if n.name == s.name).input[1]].T] for s in specs}

        def stats(batches):
            got = st.collect_cross_statistics((model, None), (model, None), specs, weights, batches,
                                              activation_bytes=1)
            return {k: v.stats for k, v in got.items()}, got
    else:
        def stats(batches):
            return st.collect_statistics(model, specs, batches, progress=False, precision="float64"), None

    padded, cross_p = stats([{"input_ids": ids, "attention_mask": mask}])
    single, cross_s = stats(alone)
    for s in specs:
        assert padded[s.name].count == single[s.name].count == sum(LENGTHS)
        np.testing.assert_allclose(padded[s.name].gram[0], single[s.name].gram[0], rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose(padded[s.name].mean[0], single[s.name].mean[0], rtol=2e-5, atol=1e-5)
    if sequential:
        for s in specs:
            np.testing.assert_allclose(cross_p[s.name].target, cross_s[s.name].target, rtol=2e-5, atol=1e-4)
            assert cross_p[s.name].energy[0] == pytest.approx(cross_s[s.name].energy[0], rel=2e-5)


def test_compile_counts_real_tokens_and_says_so(tmp_path):
    model = modelzoo.bert_encoder(layers=1, hidden=32, heads=2, vocab=200, attention_mask=True, seed=4)
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 17, size=24)
    ids, mask = _padded(rng, lengths, seq=16)
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=mask)
    res = compile_model(tmp_path / "m.onnx", tmp_path / "o.onnx", calib=tmp_path / "c.npz", calib_batch=5)
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert PADDING_NOTE in report["notes"]
    fitted = [row for row in report["layers"] if row.get("calibration_vectors") is not None]
    assert fitted and all(row["calibration_vectors"] == int(lengths.sum()) for row in fitted)
    sess = ort.InferenceSession(str(res.paths.model))
    assert np.isfinite(sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]).all()

    # the same data without a mask input: every position counts, and no note
    plain = modelzoo.bert_encoder(layers=1, hidden=32, heads=2, vocab=200, seed=4)
    onnx.save(plain, tmp_path / "p.onnx")
    np.savez(tmp_path / "p.npz", input_ids=ids)
    compile_model(tmp_path / "p.onnx", tmp_path / "po.onnx", calib=tmp_path / "p.npz")
    report = json.loads((tmp_path / "po.report.json").read_text())
    assert PADDING_NOTE not in report["notes"]
    assert all(row["calibration_vectors"] == ids.size for row in report["layers"] if row.get("calibration_vectors") is not None)


def test_gptq_grams_leave_padding_out():
    from nmcompile.passes.quantize import _add_gram

    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4, 6)).astype(np.float32)
    tokens = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    spec = st.LayerSpec("L", "a", "dense", feature_axis=-1)
    got, want = {}, {}
    _add_gram(got, "k", spec, a, tokens)
    _add_gram(want, "k", spec, a[tokens][None])
    np.testing.assert_allclose(got["k"], want["k"], rtol=1e-6)
    everything = {}
    _add_gram(everything, "k", spec, a)
    assert not np.allclose(everything["k"], got["k"])


def test_all_padding_is_refused(tmp_path, run_cli):
    model = modelzoo.bert_encoder(layers=1, hidden=32, heads=2, vocab=200, attention_mask=True, seed=4)
    onnx.save(model, tmp_path / "m.onnx")
    ids, mask = _padded(np.random.default_rng(2))
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=np.zeros_like(mask))
    code, _, err = run_cli(tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "o.onnx")
    assert code == 2 and "'attention_mask' is 0 everywhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_output_comparisons_leave_padding_out():
    from nmcompile.passes.quantize import OutputErrorMeter
    from nmcompile.runtime.verify import OutputStats

    rng = np.random.default_rng(6)
    tokens = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    ref = rng.standard_normal((2, 4, 3)).astype(np.float32)
    test = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    test[~tokens] = 100.0  # padded positions: anything
    a, b = ref[tokens].astype(np.float64), test[tokens].astype(np.float64)
    cos = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    stats = OutputStats("y")
    stats.add(ref, test, tokens)
    got = stats.result()
    assert got["cosine"] == pytest.approx(cos, rel=1e-12)
    assert got["max_abs"] == pytest.approx(float(np.abs(a - b).max()))
    assert got["mean_abs"] == pytest.approx(float(np.abs(a - b).mean()))
    assert got["padded_positions"] == 4 and got["samples"] == 2
    # the worst sample is judged on its real tokens only
    rows = [(ref[i][tokens[i]].ravel().astype(np.float64), test[i][tokens[i]].ravel().astype(np.float64)) for i in range(2)]
    worst = min(float((r * t).sum() / np.sqrt((r * r).sum() * (t * t).sum())) for r, t in rows)
    assert got["worst_sample_cosine"] == pytest.approx(worst, rel=1e-12)

    meter = OutputErrorMeter(["y"])
    meter.add([ref], [test], tokens)
    assert meter.result()["one_minus_cosine"] == pytest.approx(1 - cos, rel=1e-9)
    plain = OutputErrorMeter(["y"])
    plain.add([ref], [test])
    assert plain.result()["one_minus_cosine"] > 0.5  # the padded garbage would have dominated
