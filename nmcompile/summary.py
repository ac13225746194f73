"""The table printed on the terminal after a compile."""

from __future__ import annotations

from .inspect import format_table


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(result) -> str:
    report = result.report
    calibrated = any("reconstruction_error_adaprune" in layer for layer in report["layers"])
    rows = []
    for layer in report["layers"]:
        status = "dense: " + layer["skipped"] if layer["skipped"] else (layer["pattern"] or "dense")
        rows.append([
            layer["name"],
            layer["op"],
            "x".join(map(str, layer["shape"])),
            f"{layer['sparsity']:.1%}",
            _fmt(layer.get("retained_l1"), ".3f"),
            "yes" if layer.get("trt_sparse", {}).get("eligible") else "no",
            status,
        ])
        if calibrated:
            err = layer.get("reconstruction_error_masked"), layer.get("reconstruction_error_adaprune")
            rows[-1][5:5] = [
                "-" if err[1] is None else f"{err[0]:.4f} -> {err[1]:.4f}",
                "-" if layer["name"] not in result.timings else f"{result.timings[layer['name']]:.2f}s",
            ]
    totals = report["totals"]
    header = ["layer", "op", "shape", "sparsity", "kept L1", "TRT sparse", "pattern / why dense"]
    if calibrated:
        header[5:5] = ["rel. sq. error masked -> refit", "refit time"]
    lines = [format_table(header, rows), ""]
    lines.append(
        f"{totals['pruned_layers']} of {totals['layers']} layers pruned ({report['options']['pattern']}), "
        f"{totals['skipped_layers']} kept dense; target weights {totals['target_weights']:,}, "
        f"sparsity {totals['target_sparsity']:.1%}"
        + (f", retained L1 {totals['retained_l1']:.3f}" if totals.get("retained_l1") is not None else "")
    )
    eligible = sum(1 for layer in report["layers"] if layer.get("trt_sparse", {}).get("eligible"))
    lines.append(
        f"{eligible} layer(s) eligible for TensorRT sparse kernels (2:4 along input channels, fp16/int8, "
        f">= 256 channels; see trt_sparse.reason in the report). ONNX Runtime CPU/CUDA run N:M weights at dense speed."
    )
    quant = report.get("quantization")
    if quant:
        floats = quant.get("float_layers") or []
        err = (quant.get("output_error") or {}).get("one_minus_cosine")
        lines.append(
            f"quantized {quant['mode']} ({quant['bits']} bits): {quant.get('quantized_layers', '?')} layers, "
            f"{len(floats)} kept float{(' (' + ', '.join(f.get('name', str(f)) if isinstance(f, dict) else str(f) for f in floats) + ')') if floats else ''}; "
            f"weights {quant['weight_bytes_before']:,} -> {quant['weight_bytes_after']:,} bytes"
            + (f"; output error 1-cos {err:.2e} on the calibration data" if err is not None else "")
        )
    ranking = report.get("sensitivity_ranking")
    if ranking:
        lines.append("most sensitive layers (relative squared output error after re-fit): " + ", ".join(f"{r['name']} {r['error']:.4f}" for r in ranking[:5]))
    uncalibrated = [layer for layer in report["layers"] if str(layer.get("calibration", "")).startswith("skipped")]
    if uncalibrated:
        lines.append(f"note: {len(uncalibrated)} pruned layer(s) kept magnitude masks without a re-fit "
                     f"(e.g. {uncalibrated[0]['name']}: {uncalibrated[0]['calibration'][len('skipped: '):]}); see 'calibration' in the report")
    lines += [f"note: {note}" for note in report.get("notes", ())]
    layer_notes = [f"note: {layer['name']}: {note}" for layer in report["layers"] for note in layer.get("notes", ())]
    lines += layer_notes[:5] + ([f"note: {len(layer_notes) - 5} more layer note(s) in the report"] if len(layer_notes) > 5 else [])
    few = [layer for layer in report["layers"] if layer.get("calibration_warning")]
    if few:
        lines.append(f"warning: {len(few)} layer(s) saw fewer calibration vectors than they have inputs "
                     f"(e.g. {few[0]['name']}: {few[0]['calibration_warning']})")
    paths = result.paths
    outputs = [str(paths.model)] + ([str(result.data_path)] if result.data_path else []) + [str(paths.report), str(paths.ep)]
    lines.append("wrote " + ", ".join(outputs) + f" in {result.seconds:.2f} s")
    return "\n".join(lines)
