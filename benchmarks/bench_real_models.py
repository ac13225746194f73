"""Real pretrained models: PaddleOCR's PP-OCRv4 text recognizer and text-direction classifier.

    pip install pillow   # renders the text lines; not a dependency of nmcompile
    python benchmarks/bench_real_models.py [--sequential-rec] [--work DIR]

The models come from the `rapidocr_onnxruntime==1.3.24` wheel on PyPI (downloaded
with `pip download`, nothing installed). Data: printed text lines (words, numbers,
dates in DejaVu fonts on light backgrounds) rendered with Pillow and preprocessed
as PaddleOCR does (height 48, (x/255 - 0.5)/0.5, padded to width 320 for the
recognizer, 192 for the classifier, half of the classifier's lines turned 180°);
64 calibration and 128 held-out lines, fixed seeds.

Printed per model and mode: output cosine to the float model on the held-out
lines, the task metric (recognizer: lines whose CTC greedy decoding equals the
rendered text, and agreement with the float model's decoding; classifier:
accuracy against the turn, agreement with the float model), compile seconds.
Modes: 2:4 magnitude, --calib, --calib --sequential-calib (the recognizer's only
with --sequential-rec: minutes), int8 with each --calib-method, and ONNX
Runtime's quantize_static (QDQ, per-channel, MinMax) on the same data.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

WHEEL = "rapidocr_onnxruntime==1.3.24"
MODELS = {"recognizer": "ch_PP-OCRv4_rec_infer.onnx", "classifier": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
FONTS = [f"/usr/share/fonts/truetype/dejavu/{f}" for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")]
WORDS = ("invoice total amount date number order customer address phone email account balance payment due street "
         "city state code item price quantity tax shipping reference contact name company product model").split()


def fetch(work: Path) -> dict[str, Path]:
    wheels = work / "wheels"
    if not any(wheels.glob("*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), WHEEL], check=True)
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as z:
        for kind, name in MODELS.items():
            target = work / name
            if not target.exists():
                target.write_bytes(z.read(f"rapidocr_onnxruntime/models/{name}"))
    return {kind: work / name for kind, name in MODELS.items()}


def render(work: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(0)

    def text():
        parts = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            parts.append(rng.choice(WORDS).capitalize() if r < 0.6 else str(rng.randint(0, 99999)) if r < 0.85
                         else f"{rng.randint(1, 31):02d}/{rng.randint(1, 12):02d}/20{rng.randint(10, 30)}")
        return " ".join(parts)

    def line(t):
        font = ImageFont.truetype(rng.choice(FONTS), rng.randint(26, 36))
        img = Image.new("RGB", (int(font.getlength(t)) + 20, 48), tuple(rng.randint(200, 255) for _ in range(3)))
        ImageDraw.Draw(img).text((10, 4 + rng.randint(-2, 2)), t, font=font, fill=tuple(rng.randint(0, 60) for _ in range(3)))
        return img

    def tensor(img, width):
        w = min(width, int(img.width * 48 / img.height))
        a = (np.asarray(img.resize((w, 48)), np.float32) / 255.0 - 0.5) / 0.5
        out = np.zeros((3, 48, width), np.float32)
        out[:, :, :w] = a.transpose(2, 0, 1)
        return out

    for split, n in (("calib", 64), ("test", 128)):
        texts = [text() for _ in range(n)]
        images = [line(t) for t in texts]
        turned = np.array([rng.random() < 0.5 for _ in range(n)])
        np.savez(work / f"recognizer_{split}.npz", x=np.stack([tensor(i, 320) for i in images]))
        np.savez(work / f"classifier_{split}.npz", x=np.stack([tensor(i.rotate(180) if f else i, 192) for i, f in zip(images, turned)]),
                 labels=turned.astype(np.int64))
        (work / f"recognizer_{split}.txt").write_text("\n".join(texts))


def run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 16]})[0] for i in range(0, len(x), 16)])


def decode(probs: np.ndarray, chars: list[str]) -> list[str]:
    out = []
    for seq in probs.argmax(-1):
        s, prev = [], 0
        for c in seq:
            if c != prev and c != 0:
                s.append(chars[c])
            prev = c
        out.append("".join(s))
    return out


def task(kind: str, work: Path, model: Path, ref: np.ndarray, got: np.ndarray) -> str:
    if kind == "recognizer":
        meta = onnx.load(str(model), load_external_data=False).metadata_props
        chars = ["<blank>"] + next(p.value for p in meta if p.key == "character").splitlines() + [" "]
        truth = (work / "recognizer_test.txt").read_text().splitlines()
        a, b = decode(ref, chars), decode(got, chars)
        return (f"lines read {np.mean([y == t for y, t in zip(b, truth)]):6.1%} (float {np.mean([x == t for x, t in zip(a, truth)]):.1%}), "
                f"same as float {np.mean([x == y for x, y in zip(a, b)]):6.1%}")
    labels = np.load(work / "classifier_test.npz")["labels"]
    return (f"accuracy {np.mean(got.argmax(1) == labels):6.1%} (float {np.mean(ref.argmax(1) == labels):.1%}), "
            f"same as float {np.mean(got.argmax(1) == ref.argmax(1)):6.1%}")


def ort_minmax(src: Path, calib: Path, out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    x = np.load(calib)["x"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x[i:i + 8]} for i in range(0, len(x), 8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=CalibrationMethod.MinMax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequential-rec", action="store_true", help="also --sequential-calib on the recognizer (minutes)")
    ap.add_argument("--work", type=Path, help="folder for the wheel, data and outputs (default: a temporary one)")
    args = ap.parse_args()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark renders its text lines with Pillow: pip install pillow")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_real_"))
    work.mkdir(parents=True, exist_ok=True)
    models = fetch(work)
    render(work)
    print(f"{'model':11} {'mode':26} {'cosine':>8}  task metric{'':40} {'seconds':>8}")
    for kind, src in models.items():
        calib, test = work / f"{kind}_calib.npz", np.load(work / f"{kind}_test.npz")["x"]
        ref = run(src, test)
        modes = [("2:4 magnitude", []), ("2:4 --calib", ["--calib", calib])]
        if kind == "classifier" or args.sequential_rec:
            modes.append(("2:4 --calib --sequential", ["--calib", calib, "--sequential-calib"]))
        modes += [(f"int8 {m}" + (" (default)" if m == "minmax" else ""), ["--pattern", "none", "--quantize", "int8", "--calib", calib, "--calib-method", m])
                  for m in ("minmax", "auto", "percentile", "kl")]
        modes.append(("ORT quantize_static MinMax", None))
        for i, (mode, flags) in enumerate(modes):
            out = work / f"{kind}_{i}.onnx"
            start = time.perf_counter()
            if flags is None:
                ort_minmax(src, calib, out)
            else:
                subprocess.run(["nmcompile", str(src), "-q", "-o", str(out)] + [str(f) for f in flags], check=True)
            seconds = time.perf_counter() - start
            got = run(out, test)
            r, q = ref.reshape(-1).astype(np.float64), got.reshape(-1).astype(np.float64)
            cosine = float(r @ q / np.sqrt((r @ r) * (q @ q)))
            print(f"{kind:11} {mode:26} {cosine:8.5f}  {task(kind, work, src, ref, got):51} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
