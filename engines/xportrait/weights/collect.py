"""Collecting the tensors of the weights files onto our names, and checking them.

Every tensor of every file is either mapped onto one of our tensors (keymap.py) or ignored
for a stated reason; anything else is an error that lists the keys, as is a tensor of ours
that no file fills and a tensor of the wrong shape. (The released inference script loads
with strict=False, which would hide all three.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..config import XPortraitConfig
from ..temporal import sinusoidal_positions
from .errors import WeightsError, listing
from .keymap import CONV_AS_LINEAR, REFERENCE_UNUSED, ignored, key_map, sd15_alphas_cumprod

log = logging.getLogger(__name__)

REFERENCE_COPY = "reference net = UNet copy"


@dataclass
class Collector:
    """Tensors for our keys, where each came from, and what went wrong."""

    config: XPortraitConfig
    expected: dict[str, torch.Size]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def put(self, key: str, tensor: torch.Tensor, origin: str, fresh: dict[str, str]) -> None:
        """`fresh`: keys this file already gave; a second tensor for one must be equal (the
        two copies of a temporal module's positional table), anything else is a conflict."""
        if key in fresh:
            first = self.tensors[key]
            if first.shape != tensor.shape or not torch.equal(first, tensor):
                self.problems.append(f"{origin} and {fresh[key]} both map to {key} but differ")
            return
        fresh[key] = origin
        self.tensors[key] = tensor
        self.origin[key] = origin

    def add_released(self, sd: dict[str, torch.Tensor], source: str) -> int:
        """Map a released-layout (ldm) state dict: the released checkpoint, or an SD1.5 single
        file. Returns how many of our tensors it gave."""
        names = key_map(self.config)
        unknown: list[str] = []
        skipped: dict[str, int] = {}
        fresh: dict[str, str] = {}
        for key, tensor in sd.items():
            reason = ignored(key)
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                self._check_ignored(key, tensor, source)
                continue
            ours = names.ours(key)
            if ours is None or ours not in self.expected:
                unknown.append(key)
                continue
            self.put(ours, tensor, f"{source}: {key}", fresh)
        if unknown:
            self.problems.append(f"{source}: {len(unknown)} key(s) match nothing in the X-Portrait model "
                                 f"(config {_describe(self.config)}): {listing(unknown)}")
        for reason, n in skipped.items():
            log.info("%s: %d tensor(s) not used: %s", source, n, reason)
        return len(fresh)

    def add_ours(self, sd: dict[str, torch.Tensor], prefix: str, source: str) -> None:
        """A state dict already named as our module under `prefix` (a diffusers module)."""
        fresh: dict[str, str] = {}
        unknown = [k for k in sd if prefix + k not in self.expected]
        for k, tensor in sd.items():
            if prefix + k in self.expected:
                self.put(prefix + k, tensor, f"{source}: {k}", fresh)
        if unknown:
            self.problems.append(f"{source}: {len(unknown)} key(s) match nothing in the X-Portrait model "
                                 f"(config {_describe(self.config)}): {listing(unknown)}")

    def seed_reference_net(self, source: str) -> None:
        """The reference net starts as a copy of the SD UNet (the released training does), where
        no file gave it weights of its own."""
        for key in [k for k in self.tensors if k.startswith("unet.unet.")]:
            rest = key[len("unet.unet."):]
            target = "reference_net.unet." + rest
            if not rest.startswith(REFERENCE_UNUSED) and target not in self.tensors:
                self.tensors[target] = self.tensors[key]
                self.origin[target] = f"{source}: the UNet's {rest} ({REFERENCE_COPY})"

    def reference_is_a_copy(self) -> bool:
        return any(REFERENCE_COPY in origin for key, origin in self.origin.items() if key.startswith("reference_net."))

    def _check_ignored(self, key: str, tensor: torch.Tensor, source: str) -> None:
        if key == "alphas_cumprod":
            ours = sd15_alphas_cumprod(self.config)
            if tensor.shape != ours.shape:
                self.problems.append(f"{source}: alphas_cumprod has {list(tensor.shape)} steps, "
                                     f"SD1.5's schedule has {list(ours.shape)}")
            elif not torch.allclose(tensor.double(), ours, atol=1e-5, rtol=1e-4):
                gap = (tensor.double() - ours).abs().max().item()
                self.problems.append(f"{source}: alphas_cumprod is not SD1.5's scaled_linear schedule "
                                     f"({self.config.beta_start}..{self.config.beta_end}): max difference {gap:.3g}")
        elif key.endswith("position_ids"):
            if not torch.equal(tensor.reshape(-1).long(), torch.arange(tensor.numel())):
                self.problems.append(f"{source}: {key} is not 0..{tensor.numel() - 1}")

    def check(self) -> None:
        """Raise WeightsError with every problem found: unknown keys (found while adding),
        wrong shapes, foreign positional tables, tensors no file gave."""
        for key, tensor in self.tensors.items():
            want = self.expected[key]
            if tensor.shape != want and CONV_AS_LINEAR.match(key) and tensor.shape == (*want, 1, 1):
                tensor = self.tensors[key] = tensor[:, :, 0, 0]
            if tensor.shape != want:
                self.problems.append(f"{self.origin[key]} has shape {list(tensor.shape)}, "
                                     f"but {key} needs {list(want)}")
            elif key.endswith("pos_embed.pe"):
                table = sinusoidal_positions(want[1], want[2])
                if not torch.allclose(tensor.float(), table, atol=1e-3):
                    self.problems.append(f"{self.origin[key]} is not the sinusoidal position table "
                                         "the temporal modules use")
        missing = [k for k in self.expected if k not in self.tensors]
        if missing:
            self.problems.append(f"no weights for {len(missing)} of the model's {len(self.expected)} tensors "
                                 f"({_by_module(missing, self.expected)}): {listing(missing)}")
        if self.problems:
            raise WeightsError("cannot load the X-Portrait weights:\n- " + "\n- ".join(self.problems))


def _by_module(missing: list[str], expected: dict) -> str:
    def module(k: str) -> str:
        parts = k.split(".")
        return ".".join(parts[:2]) if parts[0] in ("unet", "reference_net") else parts[0]

    total: dict[str, int] = {}
    for k in expected:
        total[module(k)] = total.get(module(k), 0) + 1
    lacking: dict[str, int] = {}
    for k in missing:
        lacking[module(k)] = lacking.get(module(k), 0) + 1
    return ", ".join(f"{m} {n}/{total[m]}" for m, n in lacking.items())


def _describe(config: XPortraitConfig) -> str:
    return f"widths {list(config.block_out_channels)}, text {config.cross_attention_dim}"
