#!/usr/bin/env python3
"""Rebuild the example models and data sets under models/.

    python models/build_models.py              # train, export, verify
    python models/build_models.py --gradcheck  # also check the hand-written
                                               # backward passes against
                                               # finite differences (float64)

Everything is trained with numpy only (hand-written forward and backward
passes, Adam) on scikit-learn's bundled 8x8 digits data set (1797 images, no
network access needed). Seeds are fixed and no timestamps are written, so two
runs on the same machine (same numpy / BLAS) give byte-identical files.

Outputs (next to this script):
  digits_cnn.onnx             CNN with real BatchNormalization nodes, [N,1,8,8] -> [N,10]
  digits_encoder.onnx         transformer-style encoder, [N,8,8] -> [N,10]
  digits_calib.npz            input [128,1,8,8] float32 (training images)
  digits_encoder_calib.npz    input [128,8,8] float32 (the same images)
  digits_test.npz             input [360,1,8,8] float32, labels int64
  digits_encoder_test.npz     input [360,8,8] float32, labels int64
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile

# One BLAS thread: multi-threaded float32 GEMM splits its sums differently
# with the thread count, which would make the trained weights (and so the
# files' bytes) depend on the machine's core count. Set before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

OPSET = 17
IR_VERSION = 8
N_TEST = 360
N_CALIB = 128
SPLIT_SEED = 0
CNN_SEED = 1
ENC_SEED = 2
CNN_EPOCHS = 20
ENC_EPOCHS = 60
CNN_AUGMENT = True   # random one-pixel shifts of the training images
ENC_AUGMENT = True


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------

def load_data():
    """Digits scaled to [0, 1]; a seeded permutation, the last 360 are test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - a clear message, not a traceback
        sys.exit("build_models.py needs scikit-learn (pip install scikit-learn) "
                 "for its bundled digits data set")
    d = load_digits()
    x = (d.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    x, y = x[perm], y[perm]
    n_train = len(y) - N_TEST
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def save_npz(path, **arrays):
    """Like np.savez, but with fixed zip timestamps so the bytes are stable."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, val in arrays.items():
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.ascontiguousarray(val), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr_buf.getvalue())
    write_bytes(path, buf.getvalue())


def write_bytes(path, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# shared numpy pieces
# --------------------------------------------------------------------------

def softmax_xent(logits, y):
    """Mean cross-entropy and its gradient w.r.t. logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y] + 1e-12).mean()
    g = p.copy()
    g[np.arange(n), y] -= 1
    return float(loss), (g / n).astype(logits.dtype)


class Adam:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decay_keys=()):
        self.params = params
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        self.wd = weight_decay
        self.decay_keys = set(decay_keys)
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads, lr):
        self.t += 1
        b1, b2 = self.b1, self.b2
        c1 = 1 - b1 ** self.t
        c2 = 1 - b2 ** self.t
        for k, g in grads.items():
            p = self.params[k]
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            upd = (m / c1) / (np.sqrt(v / c2) + self.eps)
            if k in self.decay_keys and self.wd:
                upd = upd + self.wd * p  # decoupled (AdamW)
            p -= (lr * upd).astype(p.dtype)


def cosine_lr(step, total, lr0, warmup):
    if step < warmup:
        return lr0 * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr0 * 0.5 * (1.0 + np.cos(np.pi * t))


def shift_augment(x, rng):
    """Random shifts of up to one pixel (zero fill) on [B, 8, 8] images."""
    out = np.zeros_like(x)
    dy = rng.integers(-1, 2, size=len(x))
    dx = rng.integers(-1, 2, size=len(x))
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            sel = (dy == sy) & (dx == sx)
            if not sel.any():
                continue
            src = x[sel]
            dst = np.zeros_like(src)
            ys = slice(max(sy, 0), 8 + min(sy, 0))
            yd = slice(max(-sy, 0), 8 + min(-sy, 0))
            xs = slice(max(sx, 0), 8 + min(sx, 0))
            xd = slice(max(-sx, 0), 8 + min(-sx, 0))
            dst[:, ys, xs] = src[:, yd, xd]
            out[sel] = dst
    return out


def train_loop(name, params, loss_and_grads, predict, xtr, ytr, xte, yte, *, epochs, batch,
               lr, weight_decay, decay_keys, seed, augment):
    rng = np.random.default_rng(seed)
    opt = Adam(params, lr=lr, weight_decay=weight_decay, decay_keys=decay_keys)
    steps_per_epoch = (len(ytr) + batch - 1) // batch
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch
    step = 0
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = rng.permutation(len(ytr))
        tot = 0.0
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            xb = xtr[idx]
            if augment:
                xb = shift_augment(xb, rng)
            loss, grads = loss_and_grads(xb, ytr[idx])
            opt.step(grads, cosine_lr(step, total, lr, warmup))
            step += 1
            tot += loss * len(idx)
        if (ep + 1) % max(1, epochs // 6) == 0 or ep == epochs - 1:
            acc = (predict(xte).argmax(1) == yte).mean()
            print(f"  [{name}] epoch {ep + 1:3d}/{epochs}  loss {tot / len(ytr):.4f}  "
                  f"test acc {acc * 100:.2f}%  ({time.perf_counter() - t0:.1f}s)", flush=True)


# --------------------------------------------------------------------------
# CNN
# --------------------------------------------------------------------------

def im2col3x3(x):
    """x [N,C,H,W] -> cols [N*H*W, C*9] (3x3 kernel, pad 1, stride 1), order (c, kh, kw)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def col2im3x3(dcols, shape):
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 9).transpose(0, 3, 4, 1, 2)  # [N,C,9,H,W]
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    k = 0
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, k]
            k += 1
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b, group=1):
    """3x3 pad-1 conv. w [O, C/g, 3, 3]. Returns y [N,O,H,W] and a cache."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    cg, og = c // group, o // group
    ys, cache = [], []
    for g in range(group):
        cols = im2col3x3(x[:, g * cg:(g + 1) * cg])
        wm = w[g * og:(g + 1) * og].reshape(og, -1)
        ys.append(cols @ wm.T)
        cache.append(cols)
    y = np.concatenate(ys, axis=1) if group > 1 else ys[0]
    if b is not None:
        y = y + b
    y = y.reshape(n, h, wd, o).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y), (x.shape, w, group, cache)


def conv_bwd(dy, cache):
    xshape, w, group, cols_list = cache
    n, c, h, wd = xshape
    o = w.shape[0]
    cg, og = c // group, o // group
    dyf = dy.transpose(0, 2, 3, 1).reshape(n * h * wd, o)
    db = dyf.sum(axis=0)
    dws, dxs = [], []
    for g in range(group):
        dyg = dyf[:, g * og:(g + 1) * og]
        wm = w[g * og:(g + 1) * og].reshape(og, -1)
        dws.append((dyg.T @ cols_list[g]).reshape(og, cg, 3, 3))
        dxs.append(col2im3x3(dyg @ wm, (n, cg, h, wd)))
    dw = np.concatenate(dws, axis=0)
    dx = np.concatenate(dxs, axis=1) if group > 1 else dxs[0]
    return dx, dw, db


BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def bn_train_fwd(x, gamma, beta, state, prefix):
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mu[None, :, None, None]) * inv[None, :, None, None]
    y = xhat * gamma[None, :, None, None] + beta[None, :, None, None]
    m = x.shape[0] * x.shape[2] * x.shape[3]
    rm, rv = state[prefix + ".running_mean"], state[prefix + ".running_var"]
    rm *= 1 - BN_MOMENTUM
    rm += BN_MOMENTUM * mu
    rv *= 1 - BN_MOMENTUM
    rv += BN_MOMENTUM * var * (m / (m - 1))  # unbiased, as PyTorch does
    return y, (xhat, inv, gamma)


def bn_eval(x, gamma, beta, mean, var):
    inv = 1.0 / np.sqrt(var + BN_EPS)
    return ((x - mean[None, :, None, None]) * (inv * gamma)[None, :, None, None]
            + beta[None, :, None, None])


def bn_bwd(dy, cache):
    xhat, inv, gamma = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dbeta = dy.sum(axis=(0, 2, 3))
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    dxhat = dy * gamma[None, :, None, None]
    dx = (inv[None, :, None, None] / m) * (
        m * dxhat - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None])
    return dx, dgamma, dbeta


def maxpool_fwd(x):
    n, c, h, w = x.shape
    xr = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // 2, w // 2, 4)
    idx = xr.argmax(axis=-1)
    y = np.take_along_axis(xr, idx[..., None], axis=-1)[..., 0]
    return y, (x.shape, idx)


def maxpool_bwd(dy, cache):
    (n, c, h, w), idx = cache
    d = np.zeros((n, c, h // 2, w // 2, 4), dtype=dy.dtype)
    np.put_along_axis(d, idx[..., None], dy[..., None], axis=-1)
    return d.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


def he(rng, shape, fan_in, dtype):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


def cnn_init(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    p = {
        "conv1.weight": he(rng, (32, 1, 3, 3), 9, dtype),
        "bn1.weight": np.ones(32, dtype), "bn1.bias": np.zeros(32, dtype),
        "conv2.weight": he(rng, (64, 32, 3, 3), 32 * 9, dtype),
        "bn2.weight": np.ones(64, dtype), "bn2.bias": np.zeros(64, dtype),
        "conv3.weight": he(rng, (64, 32, 3, 3), 32 * 9, dtype),
        "conv3.bias": np.zeros(64, dtype),
        "fc1.weight": he(rng, (128, 1024), 1024, dtype),
        "fc1.bias": np.zeros(128, dtype),
        "fc2.weight": (rng.standard_normal((10, 128)) * np.sqrt(1.0 / 128)).astype(dtype),
        "fc2.bias": np.zeros(10, dtype),
    }
    state = {
        "bn1.running_mean": np.zeros(32, dtype), "bn1.running_var": np.ones(32, dtype),
        "bn2.running_mean": np.zeros(64, dtype), "bn2.running_var": np.ones(64, dtype),
    }
    return p, state


def cnn_forward_train(p, state, x):
    """x [B,1,8,8]. Returns logits and caches (BN in training mode)."""
    c = {}
    h, c["conv1"] = conv_fwd(x, p["conv1.weight"], None)
    h, c["bn1"] = bn_train_fwd(h, p["bn1.weight"], p["bn1.bias"], state, "bn1")
    c["relu1"] = h > 0
    h = h * c["relu1"]
    h, c["conv2"] = conv_fwd(h, p["conv2.weight"], None)
    h, c["bn2"] = bn_train_fwd(h, p["bn2.weight"], p["bn2.bias"], state, "bn2")
    c["relu2"] = h > 0
    h = h * c["relu2"]
    h, c["pool"] = maxpool_fwd(h)
    h, c["conv3"] = conv_fwd(h, p["conv3.weight"], p["conv3.bias"], group=2)
    c["relu3"] = h > 0
    h = h * c["relu3"]
    c["flat_shape"] = h.shape
    f = h.reshape(h.shape[0], -1)
    c["f"] = f
    z = f @ p["fc1.weight"].T + p["fc1.bias"]
    c["relu4"] = z > 0
    a = z * c["relu4"]
    c["a"] = a
    logits = a @ p["fc2.weight"].T + p["fc2.bias"]
    return logits, c


def cnn_backward(p, c, dlogits):
    g = {}
    g["fc2.weight"] = dlogits.T @ c["a"]
    g["fc2.bias"] = dlogits.sum(0)
    da = dlogits @ p["fc2.weight"]
    dz = da * c["relu4"]
    g["fc1.weight"] = dz.T @ c["f"]
    g["fc1.bias"] = dz.sum(0)
    df = dz @ p["fc1.weight"]
    dh = df.reshape(c["flat_shape"]) * c["relu3"]
    dh, g["conv3.weight"], g["conv3.bias"] = conv_bwd(dh, c["conv3"])
    dh = maxpool_bwd(dh, c["pool"])
    dh = dh * c["relu2"]
    dh, g["bn2.weight"], g["bn2.bias"] = bn_bwd(dh, c["bn2"])
    dh, g["conv2.weight"], _ = conv_bwd(dh, c["conv2"])
    dh = dh * c["relu1"]
    dh, g["bn1.weight"], g["bn1.bias"] = bn_bwd(dh, c["bn1"])
    _, g["conv1.weight"], _ = conv_bwd(dh, c["conv1"])
    return g


def cnn_predict(p, state, x, batch=512):
    """Inference (BN with running statistics). x [N,1,8,8]."""
    outs = []
    for i in range(0, len(x), batch):
        h, _ = conv_fwd(x[i:i + batch], p["conv1.weight"], None)
        h = np.maximum(bn_eval(h, p["bn1.weight"], p["bn1.bias"],
                               state["bn1.running_mean"], state["bn1.running_var"]), 0)
        h, _ = conv_fwd(h, p["conv2.weight"], None)
        h = np.maximum(bn_eval(h, p["bn2.weight"], p["bn2.bias"],
                               state["bn2.running_mean"], state["bn2.running_var"]), 0)
        h, _ = maxpool_fwd(h)
        h, _ = conv_fwd(h, p["conv3.weight"], p["conv3.bias"], group=2)
        h = np.maximum(h, 0).reshape(len(h), -1)
        h = np.maximum(h @ p["fc1.weight"].T + p["fc1.bias"], 0)
        outs.append(h @ p["fc2.weight"].T + p["fc2.bias"])
    return np.concatenate(outs)


def cnn_export(p, state, path):
    init = []

    def add(name, arr):
        init.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    for k in sorted(p):
        add(k, p[k])
    for k in sorted(state):
        add(k, state[k])

    conv_attrs = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight"], ["/conv1/Conv_output_0"],
                         name="/conv1/Conv", group=1, **conv_attrs),
        helper.make_node("BatchNormalization",
                         ["/conv1/Conv_output_0", "bn1.weight", "bn1.bias",
                          "bn1.running_mean", "bn1.running_var"],
                         ["/bn1/BatchNormalization_output_0"], name="/bn1/BatchNormalization",
                         epsilon=BN_EPS, momentum=1.0 - BN_MOMENTUM),
        helper.make_node("Relu", ["/bn1/BatchNormalization_output_0"], ["/relu1/Relu_output_0"],
                         name="/relu1/Relu"),
        helper.make_node("Conv", ["/relu1/Relu_output_0", "conv2.weight"],
                         ["/conv2/Conv_output_0"], name="/conv2/Conv", group=1, **conv_attrs),
        helper.make_node("BatchNormalization",
                         ["/conv2/Conv_output_0", "bn2.weight", "bn2.bias",
                          "bn2.running_mean", "bn2.running_var"],
                         ["/bn2/BatchNormalization_output_0"], name="/bn2/BatchNormalization",
                         epsilon=BN_EPS, momentum=1.0 - BN_MOMENTUM),
        helper.make_node("Relu", ["/bn2/BatchNormalization_output_0"], ["/relu2/Relu_output_0"],
                         name="/relu2/Relu"),
        helper.make_node("MaxPool", ["/relu2/Relu_output_0"], ["/pool/MaxPool_output_0"],
                         name="/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2],
                         pads=[0, 0, 0, 0]),
        helper.make_node("Conv", ["/pool/MaxPool_output_0", "conv3.weight", "conv3.bias"],
                         ["/conv3/Conv_output_0"], name="/conv3/Conv", group=2, **conv_attrs),
        helper.make_node("Relu", ["/conv3/Conv_output_0"], ["/relu3/Relu_output_0"],
                         name="/relu3/Relu"),
        helper.make_node("Flatten", ["/relu3/Relu_output_0"], ["/flatten/Flatten_output_0"],
                         name="/flatten/Flatten", axis=1),
        helper.make_node("Gemm", ["/flatten/Flatten_output_0", "fc1.weight", "fc1.bias"],
                         ["/fc1/Gemm_output_0"], name="/fc1/Gemm", alpha=1.0, beta=1.0, transB=1),
        helper.make_node("Relu", ["/fc1/Gemm_output_0"], ["/relu4/Relu_output_0"],
                         name="/relu4/Relu"),
        helper.make_node("Gemm", ["/relu4/Relu_output_0", "fc2.weight", "fc2.bias"], ["logits"],
                         name="/fc2/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=init,
    )
    return finish_model(graph, path, "8x8 digits CNN (conv-BN-relu x2, maxpool, grouped conv, "
                                     "2 Gemm); input pixels in [0,1]")


# --------------------------------------------------------------------------
# transformer-style encoder
# --------------------------------------------------------------------------

D_MODEL = 64
N_HEADS = 4
D_HEAD = D_MODEL // N_HEADS
D_FF = 128
N_TOK = 8
N_BLOCKS = 2
LN_EPS = 1e-5


def ln_fwd(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    inv = 1.0 / np.sqrt(var + LN_EPS)
    xhat = (x - mu) * inv
    return xhat * g + b, (xhat, inv, g)


def ln_bwd(dy, cache):
    xhat, inv, g = cache
    d = xhat.shape[-1]
    red = tuple(range(dy.ndim - 1))
    dg = (dy * xhat).sum(red)
    db = dy.sum(red)
    dxhat = dy * g
    dx = (inv / d) * (d * dxhat - dxhat.sum(-1, keepdims=True)
                      - xhat * (dxhat * xhat).sum(-1, keepdims=True))
    return dx, dg, db


def enc_init(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)

    def lin(i, o, scale=1.0):
        return (rng.standard_normal((i, o)) * (scale / np.sqrt(i))).astype(dtype)

    p = {
        "embed.weight": lin(N_TOK, D_MODEL),
        "embed.bias": np.zeros(D_MODEL, dtype),
        "pos_embed": (rng.standard_normal((1, N_TOK, D_MODEL)) * 0.1).astype(dtype),
    }
    for i in range(N_BLOCKS):
        b = f"blocks.{i}."
        p[b + "ln1.weight"] = np.ones(D_MODEL, dtype)
        p[b + "ln1.bias"] = np.zeros(D_MODEL, dtype)
        for nm in ("q", "k", "v"):
            p[b + f"attn.{nm}.weight"] = lin(D_MODEL, D_MODEL)
            p[b + f"attn.{nm}.bias"] = np.zeros(D_MODEL, dtype)
        p[b + "attn.out.weight"] = lin(D_MODEL, D_MODEL, 1.0 / np.sqrt(2 * N_BLOCKS))
        p[b + "attn.out.bias"] = np.zeros(D_MODEL, dtype)
        p[b + "ln2.weight"] = np.ones(D_MODEL, dtype)
        p[b + "ln2.bias"] = np.zeros(D_MODEL, dtype)
        p[b + "mlp.fc1.weight"] = lin(D_MODEL, D_FF, np.sqrt(2.0))
        p[b + "mlp.fc1.bias"] = np.zeros(D_FF, dtype)
        p[b + "mlp.fc2.weight"] = lin(D_FF, D_MODEL, 1.0 / np.sqrt(2 * N_BLOCKS))
        p[b + "mlp.fc2.bias"] = np.zeros(D_MODEL, dtype)
    p["ln_f.weight"] = np.ones(D_MODEL, dtype)
    p["ln_f.bias"] = np.zeros(D_MODEL, dtype)
    p["head.weight"] = (rng.standard_normal((10, D_MODEL)) * (1.0 / np.sqrt(D_MODEL))).astype(dtype)
    p["head.bias"] = np.zeros(10, dtype)
    return p


def enc_forward(p, x, keep=True):
    """x [B,8,8] -> logits [B,10]; caches for the backward pass when keep."""
    B = x.shape[0]
    c = {"x": x}
    h = x @ p["embed.weight"] + p["embed.bias"] + p["pos_embed"]
    scale = np.asarray(1.0 / np.sqrt(D_HEAD), dtype=x.dtype)
    for i in range(N_BLOCKS):
        b = f"blocks.{i}."
        a, c[b + "ln1"] = ln_fwd(h, p[b + "ln1.weight"], p[b + "ln1.bias"])
        q = a @ p[b + "attn.q.weight"] + p[b + "attn.q.bias"]
        k = a @ p[b + "attn.k.weight"] + p[b + "attn.k.bias"]
        v = a @ p[b + "attn.v.weight"] + p[b + "attn.v.bias"]
        qh = q.reshape(B, N_TOK, N_HEADS, D_HEAD).transpose(0, 2, 1, 3)
        kh = k.reshape(B, N_TOK, N_HEADS, D_HEAD).transpose(0, 2, 3, 1)  # [B,H,Dh,T]
        vh = v.reshape(B, N_TOK, N_HEADS, D_HEAD).transpose(0, 2, 1, 3)
        s = (qh @ kh) * scale
        s = s - s.max(-1, keepdims=True)
        e = np.exp(s)
        pr = e / e.sum(-1, keepdims=True)
        o = (pr @ vh).transpose(0, 2, 1, 3).reshape(B, N_TOK, D_MODEL)
        h = h + (o @ p[b + "attn.out.weight"] + p[b + "attn.out.bias"])
        m_in, c[b + "ln2"] = ln_fwd(h, p[b + "ln2.weight"], p[b + "ln2.bias"])
        z = m_in @ p[b + "mlp.fc1.weight"] + p[b + "mlp.fc1.bias"]
        mask = z > 0
        r = z * mask
        h = h + (r @ p[b + "mlp.fc2.weight"] + p[b + "mlp.fc2.bias"])
        if keep:
            c.update({b + "a": a, b + "qh": qh, b + "kh": kh, b + "vh": vh, b + "pr": pr,
                      b + "o": o, b + "m_in": m_in, b + "mask": mask, b + "r": r})
    hf, c["ln_f"] = ln_fwd(h, p["ln_f.weight"], p["ln_f.bias"])
    pooled = hf.mean(axis=1)
    c["pooled"] = pooled
    logits = pooled @ p["head.weight"].T + p["head.bias"]
    c["scale"] = scale
    return logits, c


def enc_backward(p, c, dlogits):
    g = {}
    B = dlogits.shape[0]
    scale = c["scale"]
    g["head.weight"] = dlogits.T @ c["pooled"]
    g["head.bias"] = dlogits.sum(0)
    dpooled = dlogits @ p["head.weight"]
    dhf = np.broadcast_to(dpooled[:, None, :] / N_TOK, (B, N_TOK, D_MODEL))
    dh, g["ln_f.weight"], g["ln_f.bias"] = ln_bwd(dhf, c["ln_f"])
    for i in reversed(range(N_BLOCKS)):
        b = f"blocks.{i}."
        # MLP branch
        r = c[b + "r"]
        g[b + "mlp.fc2.weight"] = np.einsum("btf,btd->fd", r, dh)
        g[b + "mlp.fc2.bias"] = dh.sum((0, 1))
        dz = (dh @ p[b + "mlp.fc2.weight"].T) * c[b + "mask"]
        g[b + "mlp.fc1.weight"] = np.einsum("btd,btf->df", c[b + "m_in"], dz)
        g[b + "mlp.fc1.bias"] = dz.sum((0, 1))
        dm_in = dz @ p[b + "mlp.fc1.weight"].T
        dx, g[b + "ln2.weight"], g[b + "ln2.bias"] = ln_bwd(dm_in, c[b + "ln2"])
        dh = dh + dx
        # attention branch
        o = c[b + "o"]
        g[b + "attn.out.weight"] = np.einsum("btc,btd->cd", o, dh)
        g[b + "attn.out.bias"] = dh.sum((0, 1))
        do = dh @ p[b + "attn.out.weight"].T
        doh = do.reshape(B, N_TOK, N_HEADS, D_HEAD).transpose(0, 2, 1, 3)
        pr, qh, kh, vh = c[b + "pr"], c[b + "qh"], c[b + "kh"], c[b + "vh"]
        dpr = doh @ vh.transpose(0, 1, 3, 2)
        dvh = pr.transpose(0, 1, 3, 2) @ doh
        ds = pr * (dpr - (dpr * pr).sum(-1, keepdims=True)) * scale
        dqh = ds @ kh.transpose(0, 1, 3, 2)          # [B,H,T,Dh]
        dkh = qh.transpose(0, 1, 3, 2) @ ds          # [B,H,Dh,T]
        dq = dqh.transpose(0, 2, 1, 3).reshape(B, N_TOK, D_MODEL)
        dk = dkh.transpose(0, 3, 1, 2).reshape(B, N_TOK, D_MODEL)
        dv = dvh.transpose(0, 2, 1, 3).reshape(B, N_TOK, D_MODEL)
        a = c[b + "a"]
        da = np.zeros_like(a)
        for nm, dd in (("q", dq), ("k", dk), ("v", dv)):
            g[b + f"attn.{nm}.weight"] = np.einsum("btc,btd->cd", a, dd)
            g[b + f"attn.{nm}.bias"] = dd.sum((0, 1))
            da += dd @ p[b + f"attn.{nm}.weight"].T
        dx, g[b + "ln1.weight"], g[b + "ln1.bias"] = ln_bwd(da, c[b + "ln1"])
        dh = dh + dx
    g["embed.weight"] = np.einsum("bti,btd->id", c["x"], dh)
    g["embed.bias"] = dh.sum((0, 1))
    g["pos_embed"] = dh.sum(0, keepdims=True)
    return g


def enc_predict(p, x, batch=512):
    return np.concatenate([enc_forward(p, x[i:i + batch], keep=False)[0]
                           for i in range(0, len(x), batch)])


def enc_export(p, path):
    init = []

    def add(name, arr, dtype=np.float32):
        init.append(numpy_helper.from_array(np.array(arr, dtype=dtype, order="C"), name))
        return name

    for k in sorted(p):
        add(k, p[k])
    add("attn_scale", np.float32(1.0 / np.sqrt(D_HEAD)))
    add("shape_heads", np.array([0, N_TOK, N_HEADS, D_HEAD]), np.int64)
    add("shape_model", np.array([0, N_TOK, D_MODEL]), np.int64)

    nodes = []

    def node(op, inputs, name, **attrs):
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    h = node("MatMul", ["input", "embed.weight"], "/embed/MatMul")
    h = node("Add", [h, "embed.bias"], "/embed/Add")
    h = node("Add", [h, "pos_embed"], "/pos_embed/Add")
    for i in range(N_BLOCKS):
        b = f"blocks.{i}."
        pre = f"/blocks.{i}"
        a = node("LayerNormalization", [h, b + "ln1.weight", b + "ln1.bias"],
                 f"{pre}/ln1/LayerNormalization", axis=-1, epsilon=LN_EPS)
        heads = {}
        for nm in ("q", "k", "v"):
            t = node("MatMul", [a, b + f"attn.{nm}.weight"], f"{pre}/attn/{nm}/MatMul")
            t = node("Add", [t, b + f"attn.{nm}.bias"], f"{pre}/attn/{nm}/Add")
            t = node("Reshape", [t, "shape_heads"], f"{pre}/attn/{nm}/Reshape")
            perm = [0, 2, 3, 1] if nm == "k" else [0, 2, 1, 3]
            heads[nm] = node("Transpose", [t], f"{pre}/attn/{nm}/Transpose", perm=perm)
        s = node("MatMul", [heads["q"], heads["k"]], f"{pre}/attn/scores/MatMul")
        s = node("Mul", [s, "attn_scale"], f"{pre}/attn/scores/Mul")
        s = node("Softmax", [s], f"{pre}/attn/Softmax", axis=-1)
        o = node("MatMul", [s, heads["v"]], f"{pre}/attn/context/MatMul")
        o = node("Transpose", [o], f"{pre}/attn/context/Transpose", perm=[0, 2, 1, 3])
        o = node("Reshape", [o, "shape_model"], f"{pre}/attn/context/Reshape")
        o = node("MatMul", [o, b + "attn.out.weight"], f"{pre}/attn/out/MatMul")
        o = node("Add", [o, b + "attn.out.bias"], f"{pre}/attn/out/Add")
        h = node("Add", [h, o], f"{pre}/residual1/Add")
        m = node("LayerNormalization", [h, b + "ln2.weight", b + "ln2.bias"],
                 f"{pre}/ln2/LayerNormalization", axis=-1, epsilon=LN_EPS)
        m = node("MatMul", [m, b + "mlp.fc1.weight"], f"{pre}/mlp/fc1/MatMul")
        m = node("Add", [m, b + "mlp.fc1.bias"], f"{pre}/mlp/fc1/Add")
        m = node("Relu", [m], f"{pre}/mlp/Relu")
        m = node("MatMul", [m, b + "mlp.fc2.weight"], f"{pre}/mlp/fc2/MatMul")
        m = node("Add", [m, b + "mlp.fc2.bias"], f"{pre}/mlp/fc2/Add")
        h = node("Add", [h, m], f"{pre}/residual2/Add")
    h = node("LayerNormalization", [h, "ln_f.weight", "ln_f.bias"], "/ln_f/LayerNormalization",
             axis=-1, epsilon=LN_EPS)
    h = node("ReduceMean", [h], "/pool/ReduceMean", axes=[1], keepdims=0)
    nodes.append(helper.make_node("Gemm", [h, "head.weight", "head.bias"], ["logits"],
                                  name="/head/Gemm", alpha=1.0, beta=1.0, transB=1))
    graph = helper.make_graph(
        nodes, "digits_encoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", N_TOK, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=init,
    )
    return finish_model(graph, path, f"8x8 digits transformer encoder ({N_BLOCKS} pre-LN blocks, "
                                     f"d={D_MODEL}, {N_HEADS} heads, ff={D_FF}); rows are tokens; "
                                     "input pixels in [0,1]")


# --------------------------------------------------------------------------
# export / verify
# --------------------------------------------------------------------------

def finish_model(graph, path, doc):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="nmcompile-models", producer_version="1")
    model.ir_version = IR_VERSION
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    write_bytes(path, model.SerializeToString(deterministic=True))
    return model


def ort_logits(path, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def verify(name, path, np_logits, x, y):
    ort_out = ort_logits(path, x)
    acc_np = float((np_logits.argmax(1) == y).mean())
    acc_ort = float((ort_out.argmax(1) == y).mean())
    diff = float(np.abs(ort_out - np_logits).max())
    print(f"{name}: numpy test acc {acc_np * 100:.2f}%  onnxruntime test acc "
          f"{acc_ort * 100:.2f}%  (max |logit diff| {diff:.2e}, n={len(y)})")
    if acc_np != acc_ort:
        raise SystemExit(f"{name}: numpy and onnxruntime accuracies differ")
    if diff > 1e-3:
        raise SystemExit(f"{name}: numpy and onnxruntime logits differ by {diff}")
    return acc_ort


# --------------------------------------------------------------------------
# gradient checks (development aid; float64)
# --------------------------------------------------------------------------

def gradcheck():
    rng = np.random.default_rng(123)
    x = rng.random((5, 8, 8))
    y = rng.integers(0, 10, 5)

    def check(name, params, loss_fn, grads):
        worst = 0.0
        for k in sorted(params):
            flat = params[k].reshape(-1)
            for j in rng.choice(flat.size, size=min(4, flat.size), replace=False):
                old = flat[j]
                flat[j] = old + 1e-5
                lp = loss_fn()
                flat[j] = old - 1e-5
                lm = loss_fn()
                flat[j] = old
                num = (lp - lm) / 2e-5
                ana = grads[k].reshape(-1)[j]
                # floor: k-biases have an exactly-zero gradient (softmax shift invariance)
                err = abs(num - ana) / max(1e-4, abs(num) + abs(ana))
                worst = max(worst, err)
        print(f"gradcheck {name}: worst relative error {worst:.2e}")
        if worst > 1e-4:
            raise SystemExit(f"gradcheck {name} failed")

    p = enc_init(7, np.float64)
    for k in p:  # non-trivial LN / bias values
        if k.endswith(".bias") or k.startswith("ln") or ".ln" in k:
            p[k] = p[k] + rng.standard_normal(p[k].shape) * 0.1
    logits, cache = enc_forward(p, x)
    _, dl = softmax_xent(logits, y)
    check("encoder", p, lambda: softmax_xent(enc_forward(p, x, keep=False)[0], y)[0],
          enc_backward(p, cache, dl))

    p, state = cnn_init(7, np.float64)
    for k in p:
        p[k] = p[k] + rng.standard_normal(p[k].shape) * 0.05
    xc = x[:, None]

    def cnn_loss():
        st = {k: v.copy() for k, v in state.items()}
        return softmax_xent(cnn_forward_train(p, st, xc)[0], y)[0]

    st = {k: v.copy() for k, v in state.items()}
    logits, cache = cnn_forward_train(p, st, xc)
    _, dl = softmax_xent(logits, y)
    check("cnn", p, cnn_loss, cnn_backward(p, cache, dl))


# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gradcheck", action="store_true",
                    help="check the backward passes against finite differences first")
    ap.add_argument("--out", default=HERE, help="output folder (default: this script's folder)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.gradcheck:
        gradcheck()

    xtr, ytr, xte, yte = load_data()
    print(f"digits: {len(ytr)} train, {len(yte)} test, calibration = first {N_CALIB} train images")
    out = args.out
    os.makedirs(out, exist_ok=True)

    save_npz(os.path.join(out, "digits_calib.npz"), input=xtr[:N_CALIB, None])
    save_npz(os.path.join(out, "digits_encoder_calib.npz"), input=xtr[:N_CALIB])
    save_npz(os.path.join(out, "digits_test.npz"), input=xte[:, None], labels=yte)
    save_npz(os.path.join(out, "digits_encoder_test.npz"), input=xte, labels=yte)

    # ---- CNN
    t0 = time.perf_counter()
    p, state = cnn_init(CNN_SEED)

    def cnn_lg(xb, yb):
        logits, cache = cnn_forward_train(p, state, xb[:, None])
        loss, dl = softmax_xent(logits, yb)
        return loss, cnn_backward(p, cache, dl)

    train_loop("cnn", p, cnn_lg, lambda x: cnn_predict(p, state, x[:, None]), xtr, ytr, xte, yte,
               epochs=CNN_EPOCHS, batch=64, lr=2e-3, weight_decay=1e-4,
               decay_keys=[k for k in p if k.endswith("weight") and not k.startswith("bn")],
               seed=CNN_SEED + 100, augment=CNN_AUGMENT)
    cnn_path = os.path.join(out, "digits_cnn.onnx")
    cnn_export(p, state, cnn_path)
    acc_cnn = verify("digits_cnn.onnx", cnn_path, cnn_predict(p, state, xte[:, None]),
                     xte[:, None], yte)
    print(f"  cnn time {time.perf_counter() - t0:.1f}s")

    # ---- encoder
    t0 = time.perf_counter()
    pe = enc_init(ENC_SEED)

    def enc_lg(xb, yb):
        logits, cache = enc_forward(pe, xb)
        loss, dl = softmax_xent(logits, yb)
        return loss, enc_backward(pe, cache, dl)

    train_loop("encoder", pe, enc_lg, lambda x: enc_predict(pe, x), xtr, ytr, xte, yte,
               epochs=ENC_EPOCHS, batch=64, lr=2e-3, weight_decay=1e-2,
               decay_keys=[k for k in pe if k.endswith("weight") and ".ln" not in k
                           and not k.startswith("ln")],
               seed=ENC_SEED + 100, augment=ENC_AUGMENT)
    enc_path = os.path.join(out, "digits_encoder.onnx")
    enc_export(pe, enc_path)
    acc_enc = verify("digits_encoder.onnx", enc_path, enc_predict(pe, xte), xte, yte)
    print(f"  encoder time {time.perf_counter() - t0:.1f}s")

    for f in ("digits_cnn.onnx", "digits_encoder.onnx", "digits_calib.npz",
              "digits_encoder_calib.npz", "digits_test.npz", "digits_encoder_test.npz"):
        print(f"  wrote {f} ({os.path.getsize(os.path.join(out, f))} bytes)")
    print(f"summary: digits_cnn.onnx {acc_cnn * 100:.2f}%  digits_encoder.onnx "
          f"{acc_enc * 100:.2f}%  total {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
