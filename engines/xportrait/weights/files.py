"""Reading weights files: safetensors and torch files, local paths and (only when allowed) hub ids.

Torch files are read with `torch.load(weights_only=True)`, which runs no code from the file.
A file that holds Python objects besides tensors (a training script's arguments, an optimizer,
a Lightning callback) is refused in one line naming the object, unless the caller trusts it
(`trust=True`, the command line's --trust-checkpoint): then it is unpickled fully, which can
run code, and the objects that are not tensors are left out with a warning.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from .errors import WeightsError, listing

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".th", ".bin")
TRUST_FLAG = "--trust-checkpoint"


def read_state_dict(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` or torch (`.ckpt .pt .pth .th .bin`) file; a
    Lightning-style {'state_dict': ...} is unwrapped, as is a DataParallel `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif suffix in TORCH_SUFFIXES:
            sd = _torch_load(path, trust)
        else:
            raise WeightsError(f"{path}: unknown weights format {suffix!r} "
                               f"(expected .safetensors or one of {', '.join(TORCH_SUFFIXES)})")
    except WeightsError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise WeightsError(_untrusted(path, str(e))) from None
        raise WeightsError(f"{path}: not a readable torch file ({e})") from None
    except Exception as e:  # truncated or foreign files fail in many ways, all meaning the same
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / ldm training files
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path}: holds no state dict (found {type(sd).__name__})")
    others = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if others and not trust:
        raise WeightsError(f"{path}: {len(others)} entries are not tensors: {listing(others)}")
    if others:
        log.warning("%s: %d entries are not tensors, left out: %s", path, len(others), ", ".join(others[:20]))
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _untrusted(path: Path, error: str) -> str:
    """One line: what the file holds, why it is not read, and the opt-in."""
    found = re.search(r"GLOBAL ([\w.]+)", error)
    what = f" (first: {found[1]})" if found else ""
    return (f"{path}: holds Python objects besides tensors{what}; they are not unpickled, since unpickling can "
            f"run code from the file. If you trust where it came from, pass {TRUST_FLAG} "
            f"(trust_checkpoint=True in Python) to unpickle it fully, or re-save its state_dict alone.")


def _torch_load(path: Path, trust: bool):
    weights_only = not trust
    try:  # mmap: a multi-GB checkpoint is paged in as it is copied, never held twice
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
    return torch.load(path, map_location="cpu", weights_only=weights_only)  # the pre-1.6 format cannot be mapped


def resolve(path: str | Path, what: str, allow_hub: bool, hub_filename: str | None = None) -> Path:
    """A local path as is. Otherwise, only with `allow_hub`, a hub id: `owner/repo/path/in/repo`
    (a file) or `owner/repo` (a diffusers folder for `base`; `hub_filename` otherwise)."""
    local = Path(path).expanduser()
    if local.exists():
        return local
    if not allow_hub:
        raise WeightsError(f"{what} not found: {local} (a local file or folder is expected; "
                           "hub ids are downloaded only when allowed: --allow-hub, or allow_hub=True in Python)")
    from huggingface_hub import hf_hub_download, snapshot_download

    parts = str(path).strip("/").split("/")
    try:
        if len(parts) > 2:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        if len(parts) == 2 and what == "base":
            names = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/config.json", "text_encoder/model.safetensors")
            return Path(snapshot_download(str(path), allow_patterns=list(names)))
        if len(parts) == 2 and hub_filename:
            return Path(hf_hub_download(str(path), hub_filename))
    except Exception as e:
        raise WeightsError(f"could not fetch {what} {path!r} from the hub: {type(e).__name__}: {e}") from None
    raise WeightsError(f"{what} {path!r}: not a local path, nor a hub id of the form owner/repo/file")
