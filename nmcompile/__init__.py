"""nmcompile: post-training N:M sparsity and quantization for ONNX models.

The Python API mirrors the command line:

    import nmcompile
    result = nmcompile.compile_model("model.onnx", pattern="2:4", calib="calib.npz")
    nmcompile.inspect_model("model.nm.onnx")
"""

__version__ = "0.1.0"

_API = {
    "compile_model": "nmcompile.pipeline",
    "CompileOptions": "nmcompile.pipeline",
    "inspect_model": "nmcompile.inspect",
}


def __getattr__(name: str):
    # Imported on first use: `nmcompile --help` should not pay for numba and onnxruntime.
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nmcompile' has no attribute {name!r}")
