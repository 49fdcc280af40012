"""Trained weights out, in the released checkpoint's layout (`model_state-*.th`) and as
safetensors: what `--checkpoint` (engines/xportrait/weights/) and the released code load.

The names come from the weights package's one key map, read backwards (`weights.to_released`),
and the .th file is written as the released training writes it (`weights.write_released`).
Before anything is written, the released-layout tensors go back through the loader's own
collector, as `load_model` reads a checkpoint: every key must land on the tensor it came
from, with its shape and values, and every tensor of the model must be filled. The
safetensors file carries the stage and step in its metadata (`stage_of`).

Files are written to a temporary name in the same folder and renamed into place, so a full
disk or a killed process never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config import XPortraitConfig
from ..weights import WeightsError, to_released, write_released
from ..weights.collect import Collector
from ..weights.keymap import NOT_RELEASED


class ExportError(RuntimeError):
    """Weights that cannot be written (a tensor with no released name, a full disk)."""


def released_weights(config: XPortraitConfig, module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s tensors (the XPortraitModel, or any module named as its parts) under their
    released names, on the CPU, checked back through the loader. Each tensor has storage of its
    own (a file holds no shared tensors): a second released name of one tensor is a copy.
    Raises ExportError naming what has no released name or does not load back."""
    ours = {k: v for k, v in module.state_dict().items() if not k.startswith(NOT_RELEASED)}
    try:
        released = to_released(config, module)
    except WeightsError as e:
        raise ExportError(f"cannot export the weights: {e}") from None
    check_loads_back(config, ours, released)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in released.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def check_loads_back(config: XPortraitConfig, ours: Mapping[str, torch.Tensor],
                     released: Mapping[str, torch.Tensor]) -> None:
    """The loader's collector on `released` (as `load_model` reads a checkpoint) must give
    back exactly `ours`: every tensor filled, no unknown key, same shapes and values."""
    found = Collector(config, {k: v.shape for k, v in ours.items()})
    found.add_released(dict(released), "the export")
    try:
        found.check()
    except WeightsError as e:
        raise ExportError(f"the exported weights would not load back: {e}") from None
    differ = [k for k, v in ours.items() if not torch.equal(found.tensors[k].to(v.device), v)]
    if differ:
        raise ExportError(f"{len(differ)} tensor(s) load back with other values: " + ", ".join(differ[:20]))


def atomic_write(path: Path, write) -> Path:
    """write(tmp_path) then rename onto `path`; on any failure the temporary file is removed
    and `path` is untouched. A full disk is an ExportError that says so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # the suffix names the format
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {e.strerror or e}"
                          + (" (the disk is full: nothing was left under that name)" if e.errno == 28 else "")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def export(model: nn.Module, out_dir: str | Path, step: int, stage: str, formats=("th", "safetensors")) -> list[Path]:
    """model_state-<step>.th (the released file's {"state_dict": ...}) and/or
    model_state-<step>.safetensors (with stage and step in its metadata) in `out_dir`."""
    from safetensors.torch import save_file

    released = released_weights(model.config, model)
    out_dir = Path(out_dir)
    written = []
    meta = {"stage": stage, "step": str(step), "format": "x-portrait released layout (ldm names)"}
    if "th" in formats:
        written.append(atomic_write(out_dir / f"model_state-{step}.th", lambda p: write_released(p, released)))
    if "safetensors" in formats:
        written.append(atomic_write(out_dir / f"model_state-{step}.safetensors",
                                    lambda p: save_file(released, str(p), metadata=meta)))
    return written


def stage_of(path: str | Path) -> str | None:
    """The stage an exported checkpoint came from: the safetensors metadata, of the file itself
    or, for a .th, of the export written beside it (None: not one of ours, e.g. the released file)."""
    path = Path(path)
    if path.suffix == ".th":
        path = path.with_suffix(".safetensors")
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("stage")
    except Exception:
        return None
