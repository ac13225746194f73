from pathlib import Path

import onnxruntime as ort
import pytest

ort.set_default_logger_severity(3)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from nmcompile.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def save(model, path):
    import onnx

    onnx.save(model, str(path))
    return path
