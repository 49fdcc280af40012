"""The modules of the streaming X-Portrait engine as graphs: flat tensors in, flat tensors out.

`torch.onnx.export` (and every runtime after it) sees only positional tensors, so each module
the streaming tick calls gets a thin wrapper here that adapts the model's call signature
(dicts of reference keys/values, lists of `TemporalPast`, lists of residuals) to a fixed,
named, documented order of tensors. The same order is what the ONNX Runtime and TensorRT
backends feed, so it lives in one place: `GraphSpec`.

Graphs (names are the file stems):

- `denoiser`: the per-tick UNet, batch S (one frame per LCM level, per-sample timesteps):
    inputs  sample (S, 4, h, w), timesteps (S,) int64,
            control_down_0 .. control_down_{D-1}, control_mid      (both ControlNets, summed)
            reference_key_i, reference_value_i  for every spatial self-attention i
                                                  (S, tokens_i, C_i), per-level reference features
            ring_m_key1, ring_m_value1, ring_m_key2, ring_m_value2  for every temporal module m
                    (S * HW_m, heads_m, W, head_dim_m): the stream's temporal cache, a ring of W
                    position-free frames per level (engines/xportrait/temporal.py, TemporalRing)
            ring_slot (1,) int64     the slot the current frames take
            ring_mask (S, W) bool    which slots each level attends to
            ring_positions (S, W) int64  each slot's temporal position
    outputs eps (S, 4, h, w),
            record_m_key1, record_m_value1, record_m_key2, record_m_value2  (S * HW_m, heads_m, 1,
            head_dim_m): the current frames' keys/values, which the caller writes into its rings at
            ring_slot (the torch model writes them in place; a graph cannot write its inputs).
- `pose_controlnet`, `local_controlnet`: sample, timesteps, hint (S, 3, H, W) -> control_down_*, control_mid
- `reference`: source_latents (R, 4, h, w), timestep (1,) int64 -> reference_key_i, reference_value_i
  (1, R * HW_i, C_i): the sources joined along the tokens, as the model does.
- `vae_encoder`: images (N, 3, H, W) in [-1, 1] -> latents (N, 4, h, w), scaled (posterior mean)
- `vae_decoder`: latents -> images (N, 3, H, W) in [-1, 1]

The empty prompt's embedding is a constant inside the graphs that use it (it never changes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engines.xportrait.model import XPortraitModel
from engines.xportrait.reference import LayerKV, self_attention_layers
from engines.xportrait.temporal import RingTick, TemporalRing

from .manifest import KV_PARTS



@dataclass
class GraphSpec:
    """Names and symbolic axes of one graph's inputs and outputs, in call order."""

    name: str
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def reference_layers(model: XPortraitModel) -> list[str]:
    """The spatial self-attentions in the order of the reference_key_i inputs."""
    return list(self_attention_layers(model.unet.unet))


def temporal_count(model: XPortraitModel) -> int:
    return len(model.unet.motion.in_order())


def control_count(model: XPortraitModel) -> int:
    """ControlNet down residuals: conv_in, every resnet of every level, every downsampler."""
    blocks = model.pose_controlnet.controlnet_down_blocks
    return len(blocks)


def control_names(model: XPortraitModel) -> list[str]:
    return [f"control_down_{i}" for i in range(control_count(model))] + ["control_mid"]


def reference_names(model: XPortraitModel) -> list[str]:
    return [f"reference_{part}_{i}" for i in range(len(reference_layers(model))) for part in ("key", "value")]


def ring_names(model: XPortraitModel) -> list[str]:
    return [f"ring_{m}_{part}" for m in range(temporal_count(model)) for part in KV_PARTS]


TICK_NAMES = ["ring_slot", "ring_mask", "ring_positions"]


def record_names(model: XPortraitModel) -> list[str]:
    return [f"record_{m}_{part}" for m in range(temporal_count(model)) for part in KV_PARTS]


def specs(model: XPortraitModel) -> dict[str, GraphSpec]:
    """Every graph's spec."""
    batch = {0: "batch"}
    controls = control_names(model)
    refs = reference_names(model)
    pasts = ring_names(model) + TICK_NAMES
    records = record_names(model)
    axes: dict[str, dict[int, str]] = {"sample": batch, "timesteps": batch, "eps": batch}
    axes.update({n: batch for n in controls})
    axes.update({n: {0: "batch", 1: f"reference_tokens_{n.rsplit('_', 1)[1]}"} for n in refs})
    for m in range(temporal_count(model)):
        for part in KV_PARTS:
            axes[f"record_{m}_{part}"] = {0: f"cache_rows_{m}"}
            axes[f"ring_{m}_{part}"] = {0: f"cache_rows_{m}", 2: "window"}
    axes["ring_mask"] = axes["ring_positions"] = {0: "batch", 1: "window"}
    control_axes = {n: batch for n in ["sample", "timesteps", "hint", *controls]}
    ref_axes = {"source_latents": {0: "sources"}}
    ref_axes.update({n: {1: f"reference_tokens_{n.rsplit('_', 1)[1]}"} for n in refs})
    return {
        "denoiser": GraphSpec("denoiser", ["sample", "timesteps", *controls, *refs, *pasts], ["eps", *records], axes),
        "pose_controlnet": GraphSpec("pose_controlnet", ["sample", "timesteps", "hint"], controls, control_axes),
        "local_controlnet": GraphSpec("local_controlnet", ["sample", "timesteps", "hint"], controls, control_axes),
        "reference": GraphSpec("reference", ["source_latents", "timestep"], refs, ref_axes),
        "vae_encoder": GraphSpec("vae_encoder", ["images"], ["latents"],
                                 {"images": {0: "frames"}, "latents": {0: "frames"}}),
        "vae_decoder": GraphSpec("vae_decoder", ["latents"], ["images"],
                                 {"latents": {0: "frames"}, "images": {0: "frames"}}),
    }


# ---------------------------------------------------------------------------------------------
# Wrappers: the model's call signatures as flat tensors
# ---------------------------------------------------------------------------------------------

class DenoiserGraph(nn.Module):
    """`TemporalUNet` with reference keys/values, ControlNet residuals and the temporal rings
    as explicit tensors (the order of `specs()["denoiser"]`)."""

    def __init__(self, model: XPortraitModel):
        super().__init__()
        self.unet = model.unet
        self.register_buffer("text", model.text, persistent=True)
        self._layers = reference_layers(model)
        self._controls = control_count(model)
        self._temporal = temporal_count(model)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, *flat: torch.Tensor):
        down = list(flat[: self._controls])
        mid = flat[self._controls]
        at = self._controls + 1
        reference = {}
        for name in self._layers:
            reference[name] = LayerKV(flat[at], flat[at + 1])
            at += 2
        slot, mask, positions = flat[at + 4 * self._temporal :]
        tick = RingTick(slot, mask, positions)
        # The model writes the current frames into the rings; in the graph that write is on
        # copies, and what was written comes out as the records.
        rings = [tuple(t.clone() for t in flat[at + 4 * m : at + 4 * m + 4]) for m in range(self._temporal)]
        eps = self.unet(sample, timesteps, self.text, 1, down, mid, [TemporalRing(r, tick) for r in rings], reference)
        return (eps, *[t.index_select(2, slot) for ring in rings for t in ring])


class ControlNetGraph(nn.Module):
    def __init__(self, controlnet: nn.Module, text: torch.Tensor):
        super().__init__()
        self.controlnet = controlnet
        self.register_buffer("text", text, persistent=True)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, hint: torch.Tensor):
        text = self.text.expand(sample.shape[0], -1, -1)
        down, mid = self.controlnet(sample, timesteps, text, hint, return_dict=False)
        return (*down, mid)


class ReferenceGraph(nn.Module):
    """The reference net on every source at once, then the denoising UNet's keys/values of
    what it recorded, sources joined along the tokens (= `XPortraitModel.reference_features`)."""

    def __init__(self, model: XPortraitModel):
        super().__init__()
        self.reference_net = model.reference_net
        layers = self_attention_layers(model.unet.unet)
        self._names = list(layers)
        # Only the projections the features go through (keys of the form "0.to_k.weight").
        self.projections = nn.ModuleList([nn.ModuleDict({"to_k": layers[n].to_k, "to_v": layers[n].to_v})
                                          for n in self._names])
        self.register_buffer("text", model.text, persistent=True)
        self._recorded = model._recorded

    def forward(self, source_latents: torch.Tensor, timestep: torch.Tensor):
        self._recorded.clear()
        self.reference_net(source_latents, timestep, self.text)
        out = []
        for name, projection in zip(self._names, self.projections):
            tokens = self._recorded[name]  # (R, N, C)
            tokens = tokens.reshape(1, -1, tokens.shape[-1])  # (1, R * N, C): sources joined
            out += [projection["to_k"](tokens), projection["to_v"](tokens)]
        self._recorded.clear()
        return tuple(out)


class EncoderGraph(nn.Module):
    def __init__(self, model: XPortraitModel):
        super().__init__()
        self.vae_encoder = model.vae.encoder
        self.quant_conv = model.vae.quant_conv
        self._scale = model.config.scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.vae_encoder(images))
        mean = moments[:, : moments.shape[1] // 2]  # the posterior mean: deterministic
        return mean * self._scale


class DecoderGraph(nn.Module):
    def __init__(self, model: XPortraitModel):
        super().__init__()
        self.vae_decoder = model.vae.decoder
        self.post_quant_conv = model.vae.post_quant_conv
        self._scale = model.config.scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_decoder(self.post_quant_conv(latents / self._scale)).clamp(-1, 1)


def wrappers(model: XPortraitModel) -> dict[str, nn.Module]:
    return {
        "denoiser": DenoiserGraph(model),
        "pose_controlnet": ControlNetGraph(model.pose_controlnet, model.text),
        "local_controlnet": ControlNetGraph(model.local_controlnet, model.text),
        "reference": ReferenceGraph(model),
        "vae_encoder": EncoderGraph(model),
        "vae_decoder": DecoderGraph(model),
    }


# ---------------------------------------------------------------------------------------------
# Example inputs: the shapes the streaming engine feeds (tracing follows them)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def temporal_shapes(model: XPortraitModel) -> list[tuple[int, int, int, int]]:
    """(module index, latent pixels, channels, heads) of every temporal module, as the
    streaming denoiser lays out its rings."""
    return [(i, pixels, channels, heads) for i, (pixels, channels, heads) in enumerate(model.temporal_shapes)]


def example_inputs(model: XPortraitModel, steps: int, window: int, sources: int = 1,
                   seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """Inputs of every graph for a stream batch of `steps` frames, a window of `window` frames
    and `sources` reference portraits, with the values' ranges of real use (random latents,
    hints in [-1, 1], timesteps of the schedule, cache keys/values the model itself records)."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    res, h = config.resolution, config.latent_size

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype)

    def hint(n):
        return (torch.rand((n, 3, res, res), generator=g) * 2 - 1).to(device, dtype)

    timesteps = torch.linspace(999, 259, steps).round().long().to(device)
    sample = rand(steps, 4, h, h)
    source_latents = rand(sources, 4, h, h)
    images = hint(sources)
    step_t = timesteps[:1]

    down, mid = model.controls(sample, timesteps, hint(steps), hint(steps))
    per_level = [model.reference_features([z[None] for z in source_latents], t) for t in timesteps]
    reference = [torch.cat([r[name][i] for r in per_level]) for name in reference_layers(model) for i in (0, 1)]
    denoiser = [sample, timesteps, *down, mid, *reference]
    for _, pixels, channels, heads in temporal_shapes(model):  # noqa: B007
        for _ in KV_PARTS:
            denoiser.append(rand(steps * pixels, heads, window, channels // heads))
    slot = window // 2
    mask = torch.ones((steps, window), dtype=torch.bool, device=device)
    mask[0, : slot] = False  # a level still filling: the mask path is traced
    positions = (torch.arange(window, device=device) - slot - 1) % window  # the current slot is newest
    denoiser += [torch.tensor([slot], device=device), mask, positions.expand(steps, -1).contiguous()]
    return {
        "denoiser": tuple(denoiser),
        "pose_controlnet": (sample, timesteps, hint(steps)),
        "local_controlnet": (sample, timesteps, hint(steps)),
        "reference": (source_latents, step_t),
        "vae_encoder": (images,),
        "vae_decoder": (rand(sources, 4, h, h),),
    }


# ---------------------------------------------------------------------------------------------
# Exporter detail
# ---------------------------------------------------------------------------------------------

ONNX_INT64 = 7  # TensorProto.INT64


def _cumsum_symbolic(g, input, dim, dtype):
    """aten::cumsum for the TorchScript exporter, bool input included: ONNX CumSum takes no
    bool, and the temporal module counts valid cache frames with `valid.cumsum(1)` (torch sums
    bools to int64, so a cast to int64 is the same result)."""
    from torch.onnx import symbolic_helper

    if input.type().scalarType() == "Bool":
        input = g.op("Cast", input, to_i=ONNX_INT64)
    dtype = symbolic_helper._maybe_get_const(dtype, "i")
    if dtype is not None and not symbolic_helper._is_value(dtype):
        input = g.op("Cast", input, to_i=symbolic_helper._type_utils.JitScalarType(dtype).onnx_type())
    axis = g.op("Constant", value_t=torch.tensor(symbolic_helper._get_const(dim, "i", "dim"), dtype=torch.int64))
    return g.op("CumSum", input, axis)


def register_symbolics(opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("aten::cumsum", _cumsum_symbolic, opset)
