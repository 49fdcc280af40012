"""What both X-Portrait engines (offline.py, live.py) need around the model: the torch device
and dtype their options ask for, the model's configuration, frames as tensors and back, and
the label burnt into every frame rendered with random weights."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from ..base import EngineError
from .config import XPortraitConfig

RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS - NOT A REAL MODEL"


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"--device {device}: no CUDA GPU is available to torch here")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on a GPU, fp32 on a CPU, unless asked."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def model_config(model_size: str, size: int) -> XPortraitConfig:
    """The model's configuration for --model-size (validated by XPortraitOptions) at `size` px."""
    return (XPortraitConfig.tiny if model_size == "tiny" else XPortraitConfig.sd15)(resolution=size)


def to_tensor(images: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 RGB (H, W, 3) images -> (N, 3, H, W) in [-1, 1]."""
    batch = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2)
    return batch.to(dtype) / 127.5 - 1.0


def to_images(frames: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 RGB (N, H, W, 3)."""
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def label_overlay(height: int, width: int, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A label in the top-left corner: (mask (H, W, 1) bool, pixels (H, W, 3) uint8)."""
    scale = max(width / 900, 0.3)
    thickness = max(1, round(scale * 2))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pixels = np.zeros((height, width, 3), np.uint8)  # the label's box is black
    cv2.putText(pixels, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 64, 64), thickness, cv2.LINE_AA)
    mask = np.zeros((height, width, 1), bool)
    mask[: th + 11, : min(width, tw + 9)] = True
    return mask, pixels


def stamp(image: np.ndarray, text: str) -> np.ndarray:
    """Burn a label into a frame, so that no output of random weights passes for a result."""
    mask, pixels = label_overlay(*image.shape[:2], text)
    np.copyto(image, pixels, where=mask)
    return image


