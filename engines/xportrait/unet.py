"""The denoising UNet as X-Portrait wires it: diffusers' SD1.5 UNet2DConditionModel with the
temporal modules placed where the released code places them, and ControlNet residuals.

diffusers' own UNetMotionModel cannot be used as is: the released modules run after every
ldm block *including its upsampler* (diffusers runs them before it), and normalise per frame.
So this module walks the diffusers blocks itself, top to bottom:

    conv_in
    down level k: (resnet, attention?, temporal) x layers, downsample      -> skip features
    + ControlNet down residuals on the skips
    mid: resnet, attention, resnet (no temporal module) + ControlNet mid residual
    up level k: (concat skip, resnet, attention?, [upsample if last], temporal) x (layers + 1)
    norm, act, conv_out

in four pieces, so that a caller may skip the middle two (the deep levels, whose result the last
up level starts from): walk_in (conv_in and the first down level's layers), walk_deep_down (its
downsampler, the deeper down levels, mid), walk_deep_up (every up level but the last), walk_out.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .reference import ReferenceKV, reference_kwargs
from .temporal import FramesKV, MotionModules

TemporalKV = tuple[FramesKV, FramesKV]  # one temporal module's new keys/values: its two attentions'


def time_embedding(unet: UNet2DConditionModel | ControlNetModel, timestep: torch.Tensor, batch: int,
                   dtype: torch.dtype) -> torch.Tensor:
    t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(-1)
    return unet.time_embedding(unet.time_proj(t).to(dtype))


class TemporalCalls:
    """The temporal modules in call order, each with its cached past (if any): the walk calls
    this after every place a module sits. With `record`, `keys` collects what each module
    returns of the current frames (position-free keys/values), in call order."""

    def __init__(self, modules: Sequence[nn.Module] | None, frames: int = 1, temporal_past: Sequence | None = None,
                 record: bool = False):
        self._modules = iter(modules) if modules is not None else None
        self._pasts = iter(temporal_past) if temporal_past is not None else None
        self.frames, self.record = frames, record
        self.keys: list[TemporalKV] = []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self._modules is None:
            return h
        module = next(self._modules)
        past = next(self._pasts) if self._pasts is not None else None
        h, keys = module(h, self.frames, past, record=self.record)
        if self.record:
            self.keys.append(keys)
        return h


class ResnetTimes:
    """What each resnet of a walk adds of the timesteps: from the time embedding `emb` (N, D),
    which each resnet projects (diffusers' forward), or each resnet's projection of it made
    beforehand (`projected`, in call order: `project_times`), for a caller whose timesteps
    repeat (the live tick's levels: the projections are made once, not at every tick)."""

    def __init__(self, emb: torch.Tensor | None = None, projected: Sequence[torch.Tensor] | None = None):
        if (emb is None) == (projected is None):
            raise ValueError("give the time embedding or the resnets' projections of it")
        self.emb = emb
        self._projected = iter(projected) if projected is not None else None

    def __call__(self, resnet: ResnetBlock2D, h: torch.Tensor) -> torch.Tensor:
        if self._projected is None:
            return resnet(h, self.emb)
        # ResnetBlock2D.forward after its time projection (SD1.5's resnets: project_times checks).
        x = resnet.conv1(resnet.nonlinearity(resnet.norm1(h)))
        x = resnet.conv2(resnet.dropout(resnet.nonlinearity(resnet.norm2(x + next(self._projected)))))
        shortcut = h if resnet.conv_shortcut is None else resnet.conv_shortcut(h)
        return (shortcut + x) / resnet.output_scale_factor


def resnets_in_order(net: UNet2DConditionModel | ControlNetModel) -> tuple[list[ResnetBlock2D], list[ResnetBlock2D]]:
    """A network's resnets in the order the walks call them: down levels and mid block, then
    the up levels (none in a ControlNet)."""
    down = [r for block in net.down_blocks for r in block.resnets] + list(net.mid_block.resnets)
    return down, [r for block in getattr(net, "up_blocks", ()) for r in block.resnets]


@torch.no_grad()
def project_times(net: UNet2DConditionModel | ControlNetModel, timesteps: torch.Tensor,
                  dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every resnet's projection of the time embedding of `timesteps` (one per batch entry):
    (N, C, 1, 1) each, for `ResnetTimes(projected=...)`: the down walk's, then the up walk's."""
    emb = time_embedding(net, timesteps, timesteps.numel(), dtype)
    projected = []
    for resnets in resnets_in_order(net):
        for r in resnets:
            if r.upsample is not None or r.downsample is not None or r.time_embedding_norm != "default" \
                    or r.skip_time_act or r.time_emb_proj is None:
                raise ValueError("projected time embeddings are for SD1.5's resnets (no resampling inside, "
                                 "the default time-embedding norm)")
        projected.append([r.time_emb_proj(r.nonlinearity(emb))[:, :, None, None] for r in resnets])
    return projected[0], projected[1]


def _down_level(block: nn.Module, h: torch.Tensor, times: ResnetTimes, text: torch.Tensor, temporal: TemporalCalls,
                kwargs: dict | None, skips: list[torch.Tensor]) -> torch.Tensor:
    """A down level's layers (resnet, attention?, temporal), before its downsampler."""
    attentions = getattr(block, "attentions", None)
    for i, resnet in enumerate(block.resnets):
        h = times(resnet, h)
        if attentions is not None:
            h = attentions[i](h, encoder_hidden_states=text, cross_attention_kwargs=kwargs, return_dict=False)[0]
        h = temporal(h)
        skips.append(h)
    return h


def walk_in(unet: UNet2DConditionModel | ControlNetModel, sample: torch.Tensor, times: ResnetTimes,
            text: torch.Tensor, temporal: TemporalCalls, reference: ReferenceKV | None = None,
            added: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in and the first down level's layers, at the latents' size: (features, skips), the
    skips being the ones the last up level takes. `added`: added to conv_in's output (a
    ControlNet's hint embedding: it has the same blocks)."""
    h = unet.conv_in(sample)
    if added is not None:
        h = h + added
    skips = [h]
    return _down_level(unet.down_blocks[0], h, times, text, temporal, reference_kwargs(reference), skips), skips


def walk_deep_down(unet: UNet2DConditionModel | ControlNetModel, h: torch.Tensor, times: ResnetTimes,
                   text: torch.Tensor, temporal: TemporalCalls,
                   reference: ReferenceKV | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """From `walk_in`'s features: the first level's downsampler, the deeper down levels and the
    mid block: (features, the skips made here)."""
    kwargs = reference_kwargs(reference)
    skips: list[torch.Tensor] = []
    for k, block in enumerate(unet.down_blocks):
        if k:
            h = _down_level(block, h, times, text, temporal, kwargs, skips)
        if block.downsamplers is not None:
            h = block.downsamplers[0](h)
            skips.append(h)
    mid = unet.mid_block
    h = times(mid.resnets[0], h)
    h = mid.attentions[0](h, encoder_hidden_states=text, cross_attention_kwargs=kwargs, return_dict=False)[0]
    return times(mid.resnets[1], h), skips


def walk_down(unet: UNet2DConditionModel | ControlNetModel, sample: torch.Tensor, times: ResnetTimes,
              text: torch.Tensor, temporal: TemporalCalls, reference: ReferenceKV | None = None,
              added: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in, the down levels and the mid block: (features, skips). Needs no ControlNet
    residual, so it can run while the ControlNets do. `reference`: the appearance reference's
    keys/values, which every self-attention joins (reference.py); None: plain attention."""
    h, skips = walk_in(unet, sample, times, text, temporal, reference, added)
    h, deeper = walk_deep_down(unet, h, times, text, temporal, reference)
    return h, skips + deeper


def _up_level(block: nn.Module, h: torch.Tensor, skips: list[torch.Tensor], times: ResnetTimes, text: torch.Tensor,
              temporal: TemporalCalls, kwargs: dict | None) -> torch.Tensor:
    """An up level: (concat skip, resnet, attention?, [upsample if last], temporal) x layers,
    taking its skips off the end of `skips`."""
    attentions = getattr(block, "attentions", None)
    last = len(block.resnets) - 1
    for i, resnet in enumerate(block.resnets):
        h = times(resnet, torch.cat([h, skips.pop()], dim=1))
        if attentions is not None:
            h = attentions[i](h, encoder_hidden_states=text, cross_attention_kwargs=kwargs, return_dict=False)[0]
        if i == last and block.upsamplers is not None:
            h = block.upsamplers[0](h)
        h = temporal(h)
    return h


def walk_deep_up(unet: UNet2DConditionModel, h: torch.Tensor, skips: list[torch.Tensor], times: ResnetTimes,
                 text: torch.Tensor, temporal: TemporalCalls, reference: ReferenceKV | None = None) -> torch.Tensor:
    """Every up level but the last, taking their skips off the end of `skips`: the features the
    last up level starts from, at the latents' size (the deep features)."""
    kwargs = reference_kwargs(reference)
    for block in unet.up_blocks[:-1]:
        h = _up_level(block, h, skips, times, text, temporal, kwargs)
    return h


def walk_out(unet: UNet2DConditionModel, h: torch.Tensor, skips: list[torch.Tensor], times: ResnetTimes,
             text: torch.Tensor, temporal: TemporalCalls, with_output: bool = True,
             reference: ReferenceKV | None = None) -> torch.Tensor | None:
    """The last up level (on `walk_in`'s skips, with their residuals) and the output."""
    h = _up_level(unet.up_blocks[-1], h, skips, times, text, temporal, reference_kwargs(reference))
    if not with_output:
        return None
    h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def add_down_residuals(skips: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    return [s + r for s, r in zip(skips, residuals, strict=True)] if residuals is not None else list(skips)


def walk_up(unet: UNet2DConditionModel, h: torch.Tensor, skips: list[torch.Tensor], times: ResnetTimes,
            text: torch.Tensor, temporal: TemporalCalls, down_residuals: Sequence[torch.Tensor] | None = None,
            mid_residual: torch.Tensor | None = None, with_output: bool = True,
            reference: ReferenceKV | None = None) -> torch.Tensor | None:
    """The ControlNet residuals, the up levels and the output."""
    skips = add_down_residuals(skips, down_residuals)
    if mid_residual is not None:
        h = h + mid_residual
    h = walk_deep_up(unet, h, skips, times, text, temporal, reference)
    return walk_out(unet, h, skips, times, text, temporal, with_output, reference)


def control_walk(controlnet: ControlNetModel, sample: torch.Tensor, projected_times: Sequence[torch.Tensor],
                 text: torch.Tensor, hint_embedding: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A ControlNet's residuals (down list, mid) from its hint's embedding
    (`controlnet.controlnet_cond_embedding(hint)`, which depends on the frame alone): diffusers'
    `ControlNetModel.forward` as X-Portrait's ControlNets run it (RGB hints, conditioning scale
    1, no class or added embeddings), with the embedding made by the caller, e.g. once a frame
    rather than at each of its levels, and its resnets' time projections too (`project_times`:
    once a level)."""
    h, first = control_walk_in(controlnet, sample, projected_times, text, hint_embedding)
    deeper, mid = control_walk_deep(controlnet, h, projected_times[len(controlnet.down_blocks[0].resnets):], text)
    return first + deeper, mid


def control_walk_in(controlnet: ControlNetModel, sample: torch.Tensor, projected_times: Sequence[torch.Tensor],
                    text: torch.Tensor, hint_embedding: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`control_walk` as far as `walk_in` goes: (its features, the residuals on its skips), for
    `control_walk_deep` to go on from (on some of the batch, or none)."""
    h, skips = walk_in(controlnet, sample, ResnetTimes(projected=projected_times),
                       text.expand(sample.shape[0], -1, -1), TemporalCalls(None), added=hint_embedding)
    return h, [block(skip) for block, skip in zip(controlnet.controlnet_down_blocks[: len(skips)], skips, strict=True)]


def control_walk_deep(controlnet: ControlNetModel, h: torch.Tensor, projected_times: Sequence[torch.Tensor],
                      text: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The rest of `control_walk` from `control_walk_in`'s features: (the deeper residuals, mid).
    `projected_times`: the resnets' after the first level's."""
    h, skips = walk_deep_down(controlnet, h, ResnetTimes(projected=projected_times), text.expand(h.shape[0], -1, -1),
                              TemporalCalls(None))
    blocks = controlnet.controlnet_down_blocks[len(controlnet.controlnet_down_blocks) - len(skips):]
    return [block(skip) for block, skip in zip(blocks, skips, strict=True)], controlnet.controlnet_mid_block(h)


def embed(unet: UNet2DConditionModel | ControlNetModel, sample: torch.Tensor, timestep: torch.Tensor,
          text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The time embedding and the text broadcast over the batch."""
    b = sample.shape[0]
    return time_embedding(unet, timestep, b, sample.dtype), text.expand(b, -1, -1) if text.shape[0] != b else text


def walk(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *,
         temporal: TemporalCalls | None = None, down_residuals: Sequence[torch.Tensor] | None = None,
         mid_residual: torch.Tensor | None = None, reference: ReferenceKV | None = None,
         with_output: bool = True) -> torch.Tensor | None:
    """One UNet evaluation. `sample` is (batch * frames, 4, h, w); `text` broadcasts over it.

    Without `with_output` the walk stops after the last up block (the reference net has no
    output conv: only what its attention layers record matters). `temporal`: the temporal
    modules to call, with their pasts (None: no temporal modules).
    """
    emb, text = embed(unet, sample, timestep, text)
    temporal, times = temporal or TemporalCalls(None), ResnetTimes(emb)
    h, skips = walk_down(unet, sample, times, text, temporal, reference)
    return walk_up(unet, h, skips, times, text, temporal, down_residuals, mid_residual, with_output, reference)


def walk_reusing(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *,
                 temporal: TemporalCalls, down_residuals: Sequence[torch.Tensor], mid_residual: torch.Tensor,
                 reference: ReferenceKV | None, deep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`walk`, which also returns its deep features (`walk_deep_up`'s: what the last up level
    starts from). Given `deep`, the deep levels are not walked: `deep` (the same frame's, from
    an earlier level, as DeepCache reuses them) stands for them, only the first residuals (the
    ones on `walk_in`'s skips) are used, and `temporal` holds only the first and last levels'
    modules. Returns (output, deep features)."""
    emb, text = embed(unet, sample, timestep, text)
    times = ResnetTimes(emb)
    h, skips = walk_in(unet, sample, times, text, temporal, reference)
    first = len(skips)
    if deep is None:
        h, deeper = walk_deep_down(unet, h, times, text, temporal, reference)
        skips = add_down_residuals(skips + deeper, down_residuals)
        deep = walk_deep_up(unet, h + mid_residual, skips, times, text, temporal, reference)
    else:
        skips = add_down_residuals(skips, down_residuals[:first])
    return walk_out(unet, deep, skips, times, text, temporal, True, reference), deep


class ReferenceNet(nn.Module):
    """The appearance module's network: an SD1.5-shaped UNet without the output conv."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        unet.conv_norm_out = None  # not in the released weights: the net's output is never used
        unet.conv_out = None
        self.unet = unet

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> None:
        walk(self.unet, latent, timestep, text, with_output=False)


class TemporalUNet(nn.Module):
    """SD1.5 UNet + temporal modules. Parameters under `unet.` and `motion.`."""

    def __init__(self, unet: UNet2DConditionModel, motion: MotionModules):
        super().__init__()
        self.unet = unet
        self.motion = motion

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, frames: int,
                down_residuals=None, mid_residual=None, temporal_past=None,
                reference: ReferenceKV | None = None) -> torch.Tensor:
        """`temporal_past[i]`: cached earlier frames for the i-th temporal module (in call
        order): TemporalPasts, or the stream's TemporalRings (written at the tick's slot)."""
        temporal = TemporalCalls(self.motion.in_order(), frames, temporal_past)
        return walk(self.unet, sample, timestep, text, temporal=temporal, down_residuals=down_residuals,
                    mid_residual=mid_residual, reference=reference)

    def forward_with_keys(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, frames: int,
                          down_residuals=None, mid_residual=None, temporal_past=None,
                          reference: ReferenceKV | None = None) -> tuple[torch.Tensor, list[TemporalKV]]:
        """`forward`, and every temporal module's position-free keys/values of the current
        frames, in call order: what a causal cache keeps of them."""
        temporal = TemporalCalls(self.motion.in_order(), frames, temporal_past, record=True)
        out = walk(self.unet, sample, timestep, text, temporal=temporal, down_residuals=down_residuals,
                   mid_residual=mid_residual, reference=reference)
        return out, temporal.keys

    def module_parts(self) -> tuple[slice, slice, slice, slice]:
        """The temporal modules (call order) of `walk_in`, `walk_deep_down`, `walk_deep_up` and
        `walk_out`."""
        first, last = len(self.unet.down_blocks[0].resnets), len(self.unet.up_blocks[-1].resnets)
        d, n = self.motion.down_count, len(self.motion.in_order())
        return slice(0, first), slice(first, d), slice(d, n - last), slice(n - last, n)

    def forward_reusing(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                        down_residuals: Sequence[torch.Tensor], mid_residual: torch.Tensor, temporal_past,
                        reference: ReferenceKV | None, deep: torch.Tensor | None = None):
        """`forward_with_keys` for one frame (`unet.walk_reusing`): (output, keys, deep features);
        given `deep`, the deep levels' modules are skipped: `temporal_past` and the keys are
        the first and last levels' modules' only."""
        modules = self.motion.in_order()
        if deep is not None:
            first, _, _, last = self.module_parts()
            modules = modules[first] + modules[last]
        temporal = TemporalCalls(modules, 1, temporal_past, record=True)
        out, deep = walk_reusing(self.unet, sample, timestep, text, temporal=temporal, down_residuals=down_residuals,
                                 mid_residual=mid_residual, reference=reference, deep=deep)
        return out, temporal.keys, deep

    # The live tick's parts with deep features reused (`walk_reusing`'s pieces, one frame per
    # batch entry; `temporal_past`: every module's, in call order; `projected_times`: every
    # resnet's, for the entries given).
    def part_in(self, sample: torch.Tensor, projected_times: Sequence[torch.Tensor], text: torch.Tensor,
                temporal_past: Sequence, reference: ReferenceKV | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        text = text.expand(sample.shape[0], -1, -1)
        part = self.module_parts()[0]
        return walk_in(self.unet, sample, ResnetTimes(projected=projected_times), text,
                       TemporalCalls(self.motion.in_order()[part], 1, temporal_past[part]), reference)

    def part_deep_down(self, h: torch.Tensor, projected_times: Sequence[torch.Tensor], text: torch.Tensor,
                       temporal_past: Sequence,
                       reference: ReferenceKV | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        text = text.expand(h.shape[0], -1, -1)
        part, first = self.module_parts()[1], len(self.unet.down_blocks[0].resnets)
        return walk_deep_down(self.unet, h, ResnetTimes(projected=projected_times[first:]), text,
                              TemporalCalls(self.motion.in_order()[part], 1, temporal_past[part]), reference)

    def part_deep_up(self, h: torch.Tensor, skips: list[torch.Tensor], projected_times: Sequence[torch.Tensor],
                     text: torch.Tensor, down_residuals: Sequence[torch.Tensor], mid_residual: torch.Tensor,
                     temporal_past: Sequence, reference: ReferenceKV | None) -> torch.Tensor:
        text = text.expand(h.shape[0], -1, -1)
        part = self.module_parts()[2]
        return walk_deep_up(self.unet, h + mid_residual, add_down_residuals(skips, down_residuals),
                            ResnetTimes(projected=projected_times), text,
                            TemporalCalls(self.motion.in_order()[part], 1, temporal_past[part]), reference)

    def part_out(self, h: torch.Tensor, skips: list[torch.Tensor], projected_times: Sequence[torch.Tensor],
                 text: torch.Tensor, down_residuals: Sequence[torch.Tensor], temporal_past: Sequence,
                 reference: ReferenceKV | None) -> torch.Tensor:
        text = text.expand(h.shape[0], -1, -1)
        part, last = self.module_parts()[3], len(self.unet.up_blocks[-1].resnets)
        return walk_out(self.unet, h, add_down_residuals(skips, down_residuals),
                        ResnetTimes(projected=projected_times[len(projected_times) - last:]), text,
                        TemporalCalls(self.motion.in_order()[part], 1, temporal_past[part]), True, reference)

    # The same evaluation in two halves, for callers that overlap the first with the ControlNets,
    # each with its resnets' time projections made beforehand (`project_times`: the live tick's
    # levels keep their timesteps).
    def down(self, sample: torch.Tensor, projected_times: Sequence[torch.Tensor], text: torch.Tensor, frames: int,
             temporal_past: Sequence, reference: ReferenceKV | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(features, skips) after the mid block."""
        text = text.expand(sample.shape[0], -1, -1)
        modules = self.motion.in_order()[: self.motion.down_count]
        temporal = TemporalCalls(modules, frames, temporal_past[: len(modules)])
        return walk_down(self.unet, sample, ResnetTimes(projected=projected_times), text, temporal, reference)

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], projected_times: Sequence[torch.Tensor],
           text: torch.Tensor, frames: int, down_residuals, mid_residual, temporal_past: Sequence,
           reference: ReferenceKV | None = None) -> torch.Tensor:
        text = text.expand(h.shape[0], -1, -1)
        d = self.motion.down_count
        temporal = TemporalCalls(self.motion.in_order()[d:], frames, temporal_past[d:])
        return walk_up(self.unet, h, skips, ResnetTimes(projected=projected_times), text, temporal, down_residuals,
                       mid_residual, reference=reference)
