"""Engines: every one meets `engines.base.Engine`. `create_engine` is the one way to get one."""

from __future__ import annotations

from .base import DrivingFrame, Engine, EngineError, Rendered, SourcePortrait, Timings

ENGINES = ("warp",)


def create_engine(name: str, size: int = 512, **options) -> Engine:
    """Build an engine by name; unknown names and bad options raise EngineError."""
    if size < 64 or size % 8:
        raise EngineError(f"size must be a multiple of 8 and at least 64, got {size}")
    if name == "warp":
        from .warp import WarpEngine

        return WarpEngine(size=size, **options)
    raise EngineError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


__all__ = ["DrivingFrame", "Engine", "EngineError", "Rendered", "SourcePortrait", "Timings",
           "ENGINES", "create_engine"]
