"""A model over 2 GB with external data: compile it and measure peak memory and time.

Prints nmcompile's peak RSS and wall time next to plain onnx load+save of the
same model (each in its own process, measured by the parent), and checks the
output by path with onnx.checker and in ONNX Runtime.

    python benchmarks/bench_large_model.py [--gb 2.2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# Each child reports its own VmHWM at exit (ru_maxrss would start at the forking parent's RSS).
REPORT_HWM = """
import atexit, sys
def _hwm():
    sys.stderr.write("VMHWM_KB " + next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")) + "\\n")
atexit.register(_hwm)
"""

LOAD_SAVE = REPORT_HWM + """
import onnx
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2], save_as_external_data=True, location="copy.onnx.data")
"""

NMCOMPILE = REPORT_HWM + """
import runpy
sys.argv = ["nmcompile"] + sys.argv[1:]
runpy.run_module("nmcompile", run_name="__main__")
"""


def build(path: Path, gigabytes: float, dim: int = 8192) -> int:
    """Stack of MatMul [dim, dim] layers written straight to external data (never all in memory)."""
    layer_bytes = dim * dim * 4
    layers = max(1, int(gigabytes * 1e9 // layer_bytes) + 1)
    rng = np.random.default_rng(0)
    data = path.with_name(path.name + ".data")
    inits, nodes, offset = [], [], 0
    x = "x"
    with open(data, "wb") as fh:
        for i in range(layers):
            w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim)))
            fh.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim], data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(layer_bytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            offset += layer_bytes
            inits.append(t)
            y = f"h{i}" if i < layers - 1 else "y"
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=f"layer{i}"))
            x = y
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return offset


def peak_of(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of a child process, as the child's own VmHWM."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.strip()[-500:]}")
    kb = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB")]
    return elapsed, kb[-1] * 1024 / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--keep", help="build in this folder and keep the files")
    args = ap.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nm-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "large.onnx"
    size = build(src, args.gb)
    print(f"model: {size / 1e9:.2f} GB of weights in external data")

    t_base, rss_base = peak_of([sys.executable, "-c", LOAD_SAVE, str(src), str(folder / "copy.onnx")])
    t_ours, rss_ours = peak_of([sys.executable, "-c", NMCOMPILE, str(src), "-o", str(folder / "large.nm.onnx"), "-q"])
    onnx.checker.check_model(str(folder / "large.nm.onnx"))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "large.nm.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": np.ones((1, 8192), np.float32)})[0]
    print(f"{'':28} {'seconds':>8} {'peak RSS GB':>12} {'RSS / model':>12}")
    print(f"{'onnx load + save (ext data)':28} {t_base:8.1f} {rss_base:12.2f} {rss_base / (size / 1e9):12.2f}")
    print(f"{'nmcompile --pattern 2:4':28} {t_ours:8.1f} {rss_ours:12.2f} {rss_ours / (size / 1e9):12.2f}")
    print(f"output checked by path and run in ONNX Runtime: y[0, :3] = {out[0, :3]}")
    if not args.keep:
        import shutil

        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
