"""Turning a compiled model into a configured, measured ONNX Runtime session."""

from .session import load

__all__ = ["load"]
