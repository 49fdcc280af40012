"""Engines: every one meets `engines.base.Engine`. `create_engine(options)` is the one way to
get one; the options (engines/options.py) say which engine and how it is configured."""

from __future__ import annotations

from .base import DrivingFrame, Engine, EngineError, Rendered, SourcePortrait, Timings
from .options import ENGINES, EngineOptions, LiveOptions, OptionError, WarpOptions, XPortraitOptions


def create_engine(options: EngineOptions, model=None, progress=None) -> Engine:
    """Build the engine `options` describe. `model`: for the xportrait engines, a model to
    render with instead of loading one: one already loaded (engines share it), or for the live
    engine any `DenoiserModel`, e.g. exported graphs (export.graph_model loads those: engines do
    not import export). `progress(done, total)`: told of each denoising step by engines that
    render a whole clip at the end (the offline diffusion engine); others never call it.
    Bad configurations raise EngineError."""
    if isinstance(options, WarpOptions):
        if model is not None:
            raise EngineError("the warp engine takes no model")
        from .warp import WarpEngine

        return WarpEngine(size=options.size, grid=options.grid)
    if isinstance(options, XPortraitOptions):
        if options.live is not None:  # live: frame by frame, a few frames late
            from .xportrait.live import XPortraitLiveEngine

            return XPortraitLiveEngine(options, model)
        from .xportrait.offline import XPortraitEngine

        return XPortraitEngine(options, model, progress=progress)  # offline: the whole clip at once
    raise EngineError(f"not engine options: {options!r}; the engines are: {', '.join(ENGINES)}")


__all__ = ["DrivingFrame", "Engine", "EngineError", "Rendered", "SourcePortrait", "Timings", "ENGINES",
           "EngineOptions", "LiveOptions", "OptionError", "WarpOptions", "XPortraitOptions", "create_engine"]
