#!/usr/bin/env python3
"""Top-1 accuracy of an ONNX classifier on a test set saved as .npz.

    python models/evaluate.py MODEL.onnx TEST.npz

The .npz holds `input` (fed to the model's first input) and `labels` (int).
The prediction is the argmax of the output named `logits` (or the model's
first output when none has that name). Importable:

    from models.evaluate import accuracy   # or put models/ on sys.path
    accuracy("models/digits_cnn.onnx", "models/digits_test.npz")
"""

from __future__ import annotations

import sys

import numpy as np


def accuracy(model_path, test_npz, batch_size: int = 512) -> float:
    """Fraction of samples whose argmax logit equals the label (CPU provider)."""
    import onnxruntime as ort

    with np.load(test_npz, allow_pickle=False) as data:
        x = np.asarray(data["input"])
        labels = np.asarray(data["labels"]).astype(np.int64).reshape(-1)
    if len(x) != len(labels):
        raise ValueError(f"{test_npz}: {len(x)} inputs but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{test_npz}: no samples")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    out_name = "logits" if "logits" in out_names else out_names[0]
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = sess.run([out_name], {in_name: x[i:i + batch_size]})[0]
        correct += int((logits.argmax(axis=-1) == labels[i:i + batch_size]).sum())
    return correct / len(labels)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python models/evaluate.py MODEL.onnx TEST.npz", file=sys.stderr)
        return 2
    try:
        acc = accuracy(argv[0], argv[1])
    except Exception as e:  # one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: top-1 accuracy {acc * 100:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
