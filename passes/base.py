"""A pass is a small object with one job; a PassManager runs them in order.

Each pass names what it needs in the shared context (`requires`) and what it
leaves there (`provides`), so a pipeline that is put together wrongly fails
before any work is done, not halfway through a long calibration.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("nmcompile")


@dataclass
class PassResult:
    changed: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileContext:
    """What the passes share: the model being rewritten and what earlier passes found."""

    model: Any  # nmcompile.graphio.LoadedModel
    options: Any  # nmcompile.pipeline.CompileOptions
    artifacts: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # per-layer report rows, by layer name
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per layer: terminal only, not the report

    def layer(self, name: str) -> dict:
        return self.layers.setdefault(name, {"name": name})

    def progress(self, items, desc: str, total: int | None = None):
        """Iterate with a progress bar on stderr when the options ask for one (tqdm,
        ~15 ms to import, only then)."""
        show = bool(getattr(self.options, "progress", False))
        if show and hasattr(items, "__len__") and len(items) <= 1 and total is None:
            show = False  # a bar for one item is flicker, not progress
        if not show:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


class Pass:
    name: str = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, ctx: CompileContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, ctx: CompileContext) -> PassResult:
        missing = [r for r in self.requires if r not in ctx.artifacts]
        if missing:
            raise RuntimeError(f"pass {self.name!r} needs {missing}, which no earlier pass provided")
        result = self.run(ctx)
        absent = [p for p in self.provides if p not in ctx.artifacts]
        if absent:
            raise RuntimeError(f"pass {self.name!r} promised {absent} but did not provide them")
        ctx.notes.extend(result.notes)
        return result


class PassManager:
    def __init__(self, passes: list[Pass], given: tuple[str, ...] = ()):
        self.passes = list(passes)
        available: set[str] = set(given)
        for p in self.passes:
            missing = [r for r in p.requires if r not in available]
            if missing:
                raise RuntimeError(f"pipeline order: {p.name!r} needs {missing} before it")
            available.update(p.provides)

    def __call__(self, ctx: CompileContext) -> list[tuple[str, PassResult]]:
        results = []
        for p in self.passes:
            log.debug("running pass %s", p.name)
            results.append((p.name, p(ctx)))
        return results
