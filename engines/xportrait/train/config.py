"""Every knob of a training run, in one frozen, validated object.

Built once at the command-line edge from a config file (TOML or JSON, keys as the field
names below) overlaid with the command's flags; the trainer receives this, never argparse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ...options import SIZE_RULE, valid_size
from .stages import STAGES

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
SIZES = ("sd15", "tiny")


class ConfigError(ValueError):
    """A training option with a value it cannot take; the message names the option."""


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "appearance"
    data: str = ""
    base: str = ""  # Stable Diffusion 1.5: a diffusers folder or one ldm file
    out: str = ""
    init: str | None = None  # a released-layout checkpoint to start from (the previous stage's export)
    resume: str | None = None  # "latest" or a checkpoint folder of this run
    model: str = "sd15"  # "tiny": the test-sized architecture (random weights, CPU)
    resolution: int | None = None  # default: the data set's size
    # optimisation
    steps: int = 30000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    adam_8bit: bool = False  # bitsandbytes' AdamW8bit (CUDA)
    ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    workers: int = 4
    # samples
    frames: int | None = None  # per sample; default: the stage's (1, 1, 16, 24)
    window: int = 16  # causal stage: the live engine's temporal window...
    lookahead: int = 0  # ...and look-ahead
    scale_augment: bool = True  # random heterogeneous scaling of the control images (paper 3.4)
    uncond_prob: float = 0.0
    cached_controls: bool = False  # I_C from `prepare-data --control-cache` (no face models in the loader)
    # bookkeeping
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    export_every: int = 0  # 0: export at the end only
    validate_every: int = 0  # 0: never
    validation_frames: int = 16
    validation_steps: int = 10  # DDIM steps of the validation render
    stop_after: int | None = None  # stop this run after so many steps (resume later)
    save: bool = True  # False: no checkpoint and no export at all (speed and memory benchmarks)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("data", "base", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (--{name})")
        if self.model not in SIZES:
            raise bad("model", f"must be one of {', '.join(SIZES)}")
        if self.mixed_precision not in PRECISIONS:
            raise bad("mixed_precision", f"must be one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints",
                     "validation_frames", "validation_steps"):
            if getattr(self, name) < 1:
                raise bad(name, "must be at least 1")
        for name in ("warmup_steps", "workers", "export_every", "validate_every", "lookahead"):
            if getattr(self, name) < 0:
                raise bad(name, "must not be negative")
        if not self.lr > 0:
            raise bad("lr", "must be positive")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise bad("uncond_prob", "must be in [0, 1)")
        if not 0.0 < self.ema_decay < 1.0:
            raise bad("ema_decay", "must be in (0, 1)")
        if self.frames is not None and self.frames < 1:
            raise bad("frames", "must be at least 1")
        if self.frames is not None and self.frames > 1 and not STAGES[self.stage].temporal:
            raise ConfigError(f"frames: the {self.stage} stage trains on single frames, got {self.frames}")
        if self.stop_after is not None and self.stop_after < 1:
            raise bad("stop_after", "must be at least 1")
        if self.resolution is not None and not valid_size(self.resolution):
            raise bad("resolution", f"must be {SIZE_RULE}")

    @property
    def clip_frames(self) -> int:
        if self.frames is not None:
            return self.frames
        stage = STAGES[self.stage]
        return self.window + 8 if stage.causal else stage.frames

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import tomllib

            values = tomllib.loads(text)
    except ValueError as e:
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a table of options")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return values


def build_config(file: str | Path | None = None, **overrides) -> TrainConfig:
    """The file's values, then every override that is not None."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def with_changes(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
