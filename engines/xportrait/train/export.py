"""Trained weights out, in the released checkpoint's layout (`model_state-*.th`) and as
safetensors: what `--checkpoint` (engines/xportrait/loading.py) and the released code load.

The key names come from inverting the loader's own rule tables (loading.ldm_parts): every
rule's pattern is expanded into the concrete ldm prefixes it matches, each mapped forward by
the rule, which gives the table ours -> ldm. Each exported key is then mapped forward again
by the loader's rules and must land on the parameter it came from: the inverse is checked
against the loader, key by key, every time. Where two ldm names load into one parameter the
released layout decides: an up block's upsampler is layer 2 of its ldm block after an
attention, layer 1 without; a temporal block's positional table is written for both of its
attentions, as the released modules each keep a copy.

Files are written to a temporary name in the same folder and renamed into place, so a full
disk or a killed process never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..config import XPortraitConfig
from ..loading import CONV_AS_LINEAR, _rename, ldm_parts

MAX_INDEX = 64  # ldm block numbers tried when expanding a rule (SD1.5 uses up to 11)
SKIPPED_PARTS = ("text_encoder.",)  # the model keeps the empty prompt's embedding, not CLIP


class ExportError(RuntimeError):
    """Weights that cannot be written (a key with no released name, a full disk)."""


def _expand(pattern: str) -> list[str]:
    """The concrete strings a rule pattern matches, for the pattern forms the rules use:
    escaped dots, `(\\d+)`, `[12]`, `([12])`, `(a|b)`, literals."""
    pieces: list[list[str]] = []
    for token in re.finditer(r"\\\.|\(\\d\+\)|\(\[(\w+)\]\)|\[(\w+)\]|\(([\w|]+)\)|[\w]+", pattern):
        text = token.group(0)
        if text == r"\.":
            pieces.append(["."])
        elif text == r"(\d+)":
            pieces.append([str(i) for i in range(MAX_INDEX)])
        elif token.group(1) or token.group(2):
            pieces.append(list(token.group(1) or token.group(2)))
        elif token.group(3):
            pieces.append(token.group(3).split("|"))
        else:
            pieces.append([text])
    if "".join(t.group(0) for t in re.finditer(r"\\\.|\(\\d\+\)|\(\[(\w+)\]\)|\[(\w+)\]|\(([\w|]+)\)|[\w]+",
                                                  pattern)) != pattern:
        raise ValueError(f"rule pattern {pattern!r} has a form the exporter cannot expand")
    return ["".join(p) for p in itertools.product(*pieces)]


def _forward(config: XPortraitConfig, ldm_key: str) -> str | None:
    """The loader's mapping of one ldm key (as _Collector.add_ldm applies it)."""
    for prefix, target, rules in ldm_parts(config):
        if ldm_key.startswith(prefix):
            ours = _rename(rules, ldm_key[len(prefix):])
            if ours is not None:
                return target + ours
    return None


@functools.lru_cache(maxsize=4)
def _inverse_table(config: XPortraitConfig) -> dict[str, list[tuple[str, tuple]]]:
    """our prefix -> [(ldm prefix, the rule's leaves)] over every rule of every part."""
    table: dict[str, list[tuple[str, tuple]]] = {}
    for prefix, target, rules in ldm_parts(config):
        if target in SKIPPED_PARTS:
            continue
        for rule in rules:
            for concrete in _expand(rule.pattern):
                m = re.match(rule.pattern, concrete)
                if m is None or m.end() != len(concrete):
                    continue
                ours = rule.to(m)
                if "<" in ours:  # a name the loader marks as impossible
                    continue
                table.setdefault(target + ours, []).append((prefix + concrete, rule.leaves))
    return table


def _leaf_candidates(rest: str, leaves: tuple) -> list[str]:
    olds = [old for old, new in leaves if rest.startswith(new)]
    if not olds:
        return [rest]
    new = next(new for old, new in leaves if rest.startswith(new))
    return [old + rest[len(new):] for old in olds]


def _released_choice(config: XPortraitConfig, ours: str, candidates: list[str], keys: set[str]) -> list[str]:
    """Among ldm names that all load into `ours`, the ones the released layout has. The
    loader's rules drop a block number's layer part for samplers (any layer of a level maps
    to its one sampler); ldm numbers them after the level's last layer."""
    if len(candidates) <= 1 or ours.endswith("pos_embed.pe"):  # both attentions' copies of the table
        return candidates
    per = config.layers_per_block + 1
    if ".downsamplers." in ours:  # input block (level + 1) * per: a block of its own
        return [c for c in candidates if (int(re.search(r"input_blocks\.(\d+)\.", c)[1]) - 1) % per == per - 1]
    m = re.match(r"(.*up_blocks\.\d+\.)upsamplers\.", ours)
    if m:  # the level's last output block: [resnet, attention?, upsample]
        layer = 2 if any(k.startswith(m[1] + "attentions.") for k in keys) else 1
        return [c for c in candidates
                if (g := re.search(r"output_blocks\.(\d+)\.(\d)\.conv\.", c)) and int(g[1]) % per == per - 1
                and int(g[2]) == layer]
    return candidates


def to_released(config: XPortraitConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our model's state dict (XPortraitModel.state_dict()) -> the released ldm layout.
    Raises ExportError for a key with no released name or one the loader would not map back."""
    table = _inverse_table(config)
    keys = set(state_dict)
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) + "." for i in range(len(parts) - 1, 0, -1)]
        found = next((p for p in prefixes if p in table), None)
        if found is None:
            problems.append(f"{key}: no released name")
            continue
        rest = key[len(found):]
        candidates = []
        for ldm_prefix, leaves in table[found]:
            for leaf in _leaf_candidates(rest, leaves):
                if _forward(config, ldm_prefix + leaf) == key:
                    candidates.append(ldm_prefix + leaf)
        chosen = _released_choice(config, key, sorted(set(candidates)), keys)
        if not chosen:
            problems.append(f"{key}: no released name that the loader maps back to it")
            continue
        value = tensor.detach().cpu().contiguous()
        if CONV_AS_LINEAR.match(key) and value.ndim == 2:  # ldm keeps these as 1x1 convolutions
            value = value[:, :, None, None]
        for i, name in enumerate(chosen):  # a second name gets its own copy (no shared storage in a file)
            out[name] = value if i == 0 else value.clone()
    if problems:
        raise ExportError(f"{len(problems)} parameter(s) cannot be exported:\n- " + "\n- ".join(problems[:20]))
    return out


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to export: every parameter and persistent buffer (the empty-prompt
    embedding `text` is not persistent: the base's text encoder makes it at load)."""
    return dict(model.state_dict())


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
    """model_state-<step>.th ({"state_dict": ...}, as the released file) and/or
    model_state-<step>.safetensors (with stage and step in its metadata) in `out_dir`."""
    from safetensors.torch import save_file

    config: XPortraitConfig = model.config
    released = to_released(config, model_weights(model))
    out_dir = Path(out_dir)
    written = []
    meta = {"stage": stage, "step": str(step), "format": "x-portrait released layout (ldm names)"}
    if "th" in formats:
        written.append(atomic_write(out_dir / f"model_state-{step}.th",
                                    lambda p: torch.save({"state_dict": released, "x-portrait-train": meta}, p)))
    if "safetensors" in formats:
        written.append(atomic_write(out_dir / f"model_state-{step}.safetensors",
                                    lambda p: save_file(released, str(p), metadata=meta)))
    return written


def stage_of(path: str | Path) -> str | None:
    """The stage an exported checkpoint came from (None: not one of ours, e.g. the released file)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("stage")
        if path.suffix == ".th" and path.is_file():
            meta = torch.load(path, map_location="meta", weights_only=True, mmap=True).get("x-portrait-train")
            return meta.get("stage") if isinstance(meta, dict) else None
    except Exception:
        return None
    return None
