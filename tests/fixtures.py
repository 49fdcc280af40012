"""Shared test fixtures (tests/ is on sys.path): the tiny X-Portrait model."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from engines.xportrait.config import XPortraitConfig
from engines.xportrait.model import XPortraitModel

TINY_RES = 64
ZERO_INIT_STD = 0.05


def compact_config(resolution: int = TINY_RES) -> XPortraitConfig:
    """XPortraitConfig.tiny with a two-level UNet (and ControlNets, reference net) of one layer
    per block: every kind of block the four-level one has (cross-attention down and up blocks,
    the plain ones, the mid block, temporal and reference attention in each) at a third of the
    cost; the VAE as tiny's, so latents are 1/8 of the frame as always. For tests of what the
    model is wired into (export, streaming), not of the released layout (that needs tiny)."""
    return replace(XPortraitConfig.tiny(resolution), block_out_channels=(16, 32), layers_per_block=1)


def tiny_model(resolution: int = TINY_RES, seed: int = 0, config: XPortraitConfig | None = None) -> XPortraitModel:
    """XPortraitConfig.tiny (or `config`) with diffusers' default initialisation, in eval mode,
    except that the zero-initialised tensors (ControlNet zero convs, the temporal modules'
    output projections, as trained modules start) get N(0, 0.05^2): as zeros they would make
    the ControlNets and temporal modules no-ops, and tests of those paths vacuous."""
    torch.manual_seed(seed)
    model = XPortraitModel(config or XPortraitConfig.tiny(resolution)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, ZERO_INIT_STD)
    return model


@contextlib.contextmanager
def one_torch_thread():
    """The tiny model's ops are too small to share: with a second thread, every op waits on a
    busy core (seconds per forward on a loaded 2-core machine instead of 0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
