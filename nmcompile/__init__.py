"""nmcompile: post-training N:M sparsity and quantization for ONNX models."""

__version__ = "0.1.0"
