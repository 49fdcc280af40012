"""Both ControlNets as one module, for the live tick.

The pose and local ControlNets have the same architecture and see the same noisy latents and
timesteps; only their weights and hints differ. torch.func's model ensembling (the weights
stacked, one forward vmapped over them) runs each of their layers as one kernel for both: the
matrix products batched, the convolutions as 2-group ones, the norms and activations over both
at once, instead of two networks' worth of small kernels on two CUDA streams. The arithmetic is
the same layer by layer; the residuals come out summed, as the released code adds them.
"""

from __future__ import annotations

import copy

import torch
from diffusers import ControlNetModel
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


def _key(name: str) -> str:
    return name.replace(".", "__")


class PairedControlNets(nn.Module):
    """Made once from the two ControlNets (a copy of their weights: make it again if they
    change); `text`: the empty prompt's embedding (1, 77, D) both attend to."""

    def __init__(self, pose: ControlNetModel, local: ControlNetModel, text: torch.Tensor):
        super().__init__()
        with torch.no_grad():
            params, buffers = stack_module_state([pose, local])
        self._param_names, self._buffer_names = list(params), list(buffers)
        for name, stacked in {**params, **buffers}.items():
            stacked = stacked.detach()
            single = pose.get_parameter(name) if name in params else pose.get_buffer(name)
            if single.dim() == 4 and single.is_contiguous(memory_format=torch.channels_last):
                # As each network's convolutions are laid out: (2, O, I, k, k) flattens to 2 x O
                # channels-last filters, the grouped convolution's weight.
                stacked = stacked.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(stacked.shape)
            self.register_buffer(_key(name), stacked, persistent=False)  # not in any state dict
        self.register_buffer("text", text.detach().clone(), persistent=False)
        self._base = [copy.deepcopy(pose).to("meta")]  # the architecture only (a list: not a submodule)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, pose_hint: torch.Tensor,
                local_hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Both ControlNets' residuals (down list, mid), summed."""
        n = sample.shape[0]
        text = self.text.expand(n, -1, -1)
        t = timestep.reshape(-1).expand(n) if timestep.numel() == 1 else timestep
        params = {name: getattr(self, _key(name)) for name in self._param_names}
        buffers = {name: getattr(self, _key(name)) for name in self._buffer_names}

        def one(p, b, hint):
            down, mid = functional_call(self._base[0], (p, b), (sample, t, text, hint), {"return_dict": False})
            return list(down), mid

        down, mid = vmap(one)(params, buffers, torch.stack([pose_hint, local_hint]))
        return [d.sum(dim=0) for d in down], mid.sum(dim=0)
