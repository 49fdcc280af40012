"""The training loop: Hugging Face accelerate around one stage's loss.

Devices and scale are accelerate's: mixed precision (bf16/fp16), gradient accumulation, DDP
across GPUs and nodes when started with `accelerate launch` (this code does not change).
AdamW (bitsandbytes' 8-bit one on request), optional EMA of the trained modules, a
diffusers learning-rate schedule, a tqdm bar with the loss and steps/s, TensorBoard logs.

A run's folder:

    OUT/checkpoints/step-000100/   accelerator.save_state (model, optimizer, scheduler, RNG of
                                   every process, EMA) + train_state.json (stage, step, config)
    OUT/model_state-<step>.th      exports in the released layout (and .safetensors)
    OUT/losses.jsonl               step, loss, learning rate
    OUT/validation/step-<step>.mp4 and validation.jsonl (motion accuracy)
    OUT/logs/                      TensorBoard

Every file lands under its final name by rename, after it was written whole: a stopped
run or a full disk leaves the previous checkpoint intact and no half-written one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ...base import EngineError
from ..config import XPortraitConfig
from ..weights import WeightsError, load_model, write_released
from ..model import XPortraitModel
from .config import TrainConfig
from .data import ClipSet, DataError
from .dataset import SampleSpec, TrainingSamples
from .export import ExportError, atomic_write, export, released_weights, stage_of
from .stages import MODULES, ORDER, STAGES, StageForward, freeze_for, submodule

log = logging.getLogger(__name__)
STATE = "train_state.json"


class TrainError(EngineError):
    """A training run that cannot start or go on; the message says why."""


# ---------------------------------------------------------------------------------------------
# The model to train
# ---------------------------------------------------------------------------------------------

def model_config(config: TrainConfig, resolution: int) -> XPortraitConfig:
    size = config.resolution or resolution
    return XPortraitConfig.tiny(size) if config.model == "tiny" else XPortraitConfig.sd15(size)


def fresh_modules(config: XPortraitConfig) -> torch.nn.Module:
    """M and both ControlNets as the released training starts them, named as in the model
    (`unet.motion.`, `pose_controlnet.`, `local_controlnet.`): M with zero output projections
    (each module an identity), ControlNets with the default init (their UNet part is copied
    from the base UNet after loading; zero output convolutions)."""
    import copy

    from diffusers import ControlNetModel

    from ..temporal import MotionModules

    motion = MotionModules(config.block_out_channels, config.layers_per_block, config.motion_heads,
                           config.motion_max_len, config.norm_num_groups)
    for module in motion.in_order():
        torch.nn.init.zeros_(module.proj_out.weight)
        torch.nn.init.zeros_(module.proj_out.bias)
    fresh = torch.nn.Module()
    fresh.unet = torch.nn.Module()
    fresh.unet.motion = motion
    fresh.pose_controlnet = ControlNetModel(**config.controlnet_kwargs())
    fresh.local_controlnet = copy.deepcopy(fresh.pose_controlnet)  # two modules, two storages
    return fresh


def _copy_unet_into_controlnets(model: XPortraitModel) -> None:
    """ControlNetModel.from_unet's start: the UNet's encoder, zero output convolutions."""
    from diffusers import ControlNetModel

    c = model.config
    fresh = ControlNetModel.from_unet(model.unet.unet, conditioning_embedding_out_channels=c.conditioning_channels)
    state = fresh.state_dict()
    model.pose_controlnet.load_state_dict(state)
    model.local_controlnet.load_state_dict(state)


RANDOM_BASE = "random"  # benchmarks only: every SD1.5 weight drawn at random (labelled so in the logs)


def build_model(config: TrainConfig, resolution: int, scratch: Path, device="cpu") -> XPortraitModel:
    """SD1.5 from `base`, the X-Portrait modules from `init` (or fresh), with the engine's loader."""
    xp = model_config(config, resolution)
    stage = STAGES[config.stage]
    if config.base == RANDOM_BASE:
        if config.init:
            raise TrainError("--base random draws every weight: it takes no --init")
        from ..weights import random_model

        log.warning("--base random: RANDOM Stable Diffusion weights (for speed and memory measurements only)")
        model = random_model(xp, config.seed, device)
        model.load_state_dict({**model.state_dict(), **fresh_modules(xp).state_dict()})
        _copy_unet_into_controlnets(model)
        return model.train()
    base = Path(config.base)
    if not base.exists():
        raise TrainError(f"--base {base}: no such file or folder (Stable Diffusion 1.5: a diffusers folder "
                         "or one .safetensors/.ckpt file)")
    init = Path(config.init) if config.init else None
    if init is not None and not init.is_file():
        raise TrainError(f"--init {init}: no such file")
    if init is None and ORDER.index(stage.name) > 0:
        log.warning("stage %s without --init: the modules of the earlier stages are untrained "
                    "(pass the previous stage's export or the released checkpoint)", stage.name)
    checkpoint = init
    if init is None:  # the loader wants every tensor: the fresh modules go in as a checkpoint
        scratch.mkdir(parents=True, exist_ok=True)  # one file per process: every rank of a run loads
        checkpoint = atomic_write(scratch / f"fresh-modules-{os.getpid()}.th",
                                  lambda p: write_released(p, released_weights(xp, fresh_modules(xp))))
    try:
        model = load_model(xp, base=base, checkpoint=checkpoint)
    except WeightsError as e:
        what = "the --init checkpoint" if init is not None and str(init) in str(e) else "--base"
        lines = str(e).splitlines()
        shown = "\n".join(lines[:4]) + (f"\n- ... and {len(lines) - 4} more" if len(lines) > 4 else "")
        raise TrainError(f"{what} does not fit X-Portrait on Stable Diffusion 1.5 "
                         f"({'tiny test size' if config.model == 'tiny' else 'SD1.5 size'}): {shown}") from None
    finally:
        if init is None:
            checkpoint.unlink(missing_ok=True)
    if init is None:
        _copy_unet_into_controlnets(model)
    return model.train()


def enable_checkpointing(model: XPortraitModel) -> None:
    """Activation checkpointing: diffusers' own in the UNets, the ControlNets and their
    attention blocks, torch's wrapper on every resnet and temporal module the UNet walk calls
    directly. The reference keys/values are an argument of every attention call
    (cross_attention_kwargs), so the recomputation in backward gets the forward's."""
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    from ..temporal import TemporalModule

    model.unet.unet.enable_gradient_checkpointing()
    for module in (model.reference_net.unet, model.pose_controlnet, model.local_controlnet):
        module.enable_gradient_checkpointing()
    wrap = lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for root in (model.unet, model.reference_net):
        apply_activation_checkpointing(root, checkpoint_wrapper_fn=wrap,
                                       check_fn=lambda m: isinstance(m, (ResnetBlock2D, TemporalModule)))


def cast_frozen(model: XPortraitModel, trains: tuple[str, ...], dtype: torch.dtype) -> None:
    """Frozen modules in the compute dtype (half the memory); trained ones stay float32."""
    for path in MODULES:
        if path not in trains:
            submodule(model, path).to(dtype)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE).is_file())


def read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{folder}: not a training checkpoint ({e})") from None


def resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    out = Path(config.out)
    if config.resume == "latest":
        found = checkpoints(out)
        return found[-1] if found else None
    folder = Path(config.resume)
    if not (folder / STATE).is_file():
        raise TrainError(f"--resume {folder}: not a training checkpoint (no {STATE})")
    return folder


def save_checkpoint(accelerator, out: Path, step: int, config: TrainConfig, keep: int) -> Path:
    """accelerator.save_state into a temporary folder, renamed into place when whole."""
    folder = out / "checkpoints" / f"step-{step:06d}"
    partial = folder.with_name(folder.name + ".partial")
    try:
        if accelerator.is_main_process:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)  # before any process writes its part into it
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / STATE).write_text(json.dumps({"stage": config.stage, "step": step, "config": config.as_dict()}))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(partial, folder)
            for old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainError(f"cannot write the checkpoint of step {step} to {folder}: {e.strerror or e}"
                         + (" (the disk is full; the last whole checkpoint is kept)" if e.errno == 28 else "")) from None
    accelerator.wait_for_everyone()
    return folder


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _optimizer(config: TrainConfig, params):
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                  eps=config.adam_eps)
    if config.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainError("adam_8bit needs bitsandbytes: pip install 'xportrait[train8bit]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _batch_inputs(batch: dict, stage) -> dict:
    inputs = {"source": batch["source"], "target": batch["target"], "uncond": batch["uncond"]}
    if stage.controls:
        inputs["control"], inputs["local"] = batch["control"], batch["local"]
    return inputs


def train(config: TrainConfig, progress: bool = True, after_backward=None) -> dict:
    """Run (or resume) one stage. Returns {"step", "losses", "exports", "checkpoint", "model"}.

    `after_backward(accelerator, net, inputs, generator)`, if given, runs after each
    micro-batch's backward, before the optimizer step (tests look at the gradients there)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    stage = STAGES[config.stage]
    out = Path(config.out)
    try:
        clips = ClipSet(config.data)
    except DataError as e:
        raise TrainError(str(e)) from None
    resume = resolve_resume(config)
    if resume is not None:
        saved = read_state(resume)
        if saved.get("stage") != config.stage:
            raise TrainError(f"--resume {resume}: a checkpoint of the {saved.get('stage')!r} stage; "
                             f"this run trains {config.stage!r} (start it with --init <that stage's export>)")
    if config.init and stage_of(config.init) is not None:
        init_stage = stage_of(config.init)
        if init_stage in ORDER and ORDER.index(init_stage) > ORDER.index(stage.name):
            log.warning("--init comes from the later %s stage; training %s on top of it", init_stage, stage.name)

    ddp = DistributedDataParallelKwargs(find_unused_parameters=stage.name == "appearance")  # R's last layers feed nothing
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPUs, processes under torchrun/mpirun join over gloo
        gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
        log_with="tensorboard", kwargs_handlers=[ddp],
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    set_seed(config.seed)  # fresh modules start the same on every process (noise: noise_generator)

    if config.resolution is not None and config.resolution != clips.size:
        raise TrainError(f"resolution {config.resolution} but the data set's clips are {clips.size}²: "
                         "prepare the data at that --size")
    model = build_model(config, clips.size, out / ".scratch", accelerator.device)
    params = freeze_for(model, stage)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    cast_frozen(model, stage.trains, weight_dtype)
    model.text = model.text.to(weight_dtype)

    pattern = None
    frames = config.clip_frames
    if stage.causal:
        from .causal import live_pattern

        pattern = live_pattern(frames, config.window, config.lookahead, model.config.motion_max_len)
        pattern = type(pattern)(*(t.to(accelerator.device) for t in (pattern.mask, pattern.positions,
                                                                        pattern.query_positions)))
    elif stage.temporal and frames > model.config.motion_max_len:
        raise TrainError(f"frames {frames} exceed the temporal modules' {model.config.motion_max_len} positions")

    per_step = config.batch_size * config.grad_accum * accelerator.num_processes
    try:
        samples = TrainingSamples(clips, SampleSpec(frames=frames, controls=stage.controls, scale=config.scale_augment,
                                                    uncond_prob=config.uncond_prob, cached=config.cached_controls), config.seed, config.steps * per_step)
    except DataError as e:
        raise TrainError(str(e)) from None
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, shuffle=False,
                                         num_workers=config.workers, persistent_workers=config.workers > 0,
                                         pin_memory=accelerator.device.type == "cuda")
    net = StageForward(model, stage, pattern)
    optimizer = _optimizer(config, params)
    scheduler = get_scheduler(config.lr_schedule, optimizer,
                              num_warmup_steps=config.warmup_steps * accelerator.num_processes,
                              num_training_steps=config.steps * accelerator.num_processes)
    ema = None
    if config.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    net, optimizer, loader, scheduler = accelerator.prepare(net, optimizer, loader, scheduler)

    step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        step = int(read_state(resume)["step"])
        loader_iter = accelerator.skip_first_batches(loader, step * config.grad_accum)
        log.info("resumed from %s at step %d", resume, step)
    else:
        loader_iter = loader
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    # Every process calls it; accelerate opens the writers on the main one.
    accelerator.init_trackers("xportrait-train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                         for k, v in config.as_dict().items()})
    last = config.steps if config.stop_after is None else min(config.steps, step + config.stop_after)
    bar = tqdm(total=config.steps, initial=step, desc=f"train {stage.name}", unit="step",
               disable=not (progress and accelerator.is_main_process))
    losses: list[dict] = []
    exports: list[Path] = []
    checkpoint = None
    micro_losses: list[torch.Tensor] = []
    started, started_step = time.perf_counter(), step
    trained_params = [p for p in net.parameters() if p.requires_grad]
    micro = step * config.grad_accum
    step_started = time.perf_counter()
    try:
        for batch in loader_iter:
            if step >= last:
                break
            # Noise and timesteps from (seed, micro-batch, rank) alone: a resumed run draws what
            # the uninterrupted one did, whatever else touched the global RNG in between.
            generator = noise_generator(config.seed, micro, accelerator.process_index, accelerator.device)
            micro += 1
            with accelerator.accumulate(net):
                inputs = _batch_inputs(batch, stage)
                loss = net(**inputs, generator=generator)
                accelerator.backward(loss)
                if after_backward is not None:
                    after_backward(accelerator, net, inputs, noise_generator(config.seed, micro - 1,
                                                                             accelerator.process_index,
                                                                             accelerator.device))
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trained_params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step(params)
            mean = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            micro_losses = []
            if not math.isfinite(mean):
                raise TrainError(f"the loss is {mean} at step {step} (try a lower lr, or bf16 instead of fp16)")
            lr = scheduler.get_last_lr()[0]
            now = time.perf_counter()
            record = {"step": step, "loss": mean, "lr": lr, "seconds": now - step_started}
            step_started = now
            if accelerator.device.type == "cuda":
                record["peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2 ** 30
            losses.append(record)
            rate = (step - started_step) / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}", steps_per_s=f"{rate:.2f}")
            if accelerator.is_main_process:
                _append(out / "losses.jsonl", losses[-1])
            if step % config.log_every == 0 or step == last:
                accelerator.log({"train/loss": mean, "train/lr": lr, "train/steps_per_s": rate}, step=step)
            if config.save and (step % config.checkpoint_every == 0 or step == last):
                checkpoint = save_checkpoint(accelerator, out, step, config, config.keep_checkpoints)
            if config.validate_every and step % config.validate_every == 0 and accelerator.is_main_process:
                with accelerator.autocast():  # frozen modules may be in bf16/fp16, trained ones in fp32
                    figures = validate(accelerator.unwrap_model(net).model, clips, config, out, step, ema, params)
                accelerator.log({f"val/{k}": v for k, v in figures.items() if isinstance(v, float)}, step=step)
            if config.save and ((config.export_every and step % config.export_every == 0) or step == config.steps):
                exports += _export(accelerator, net, ema, params, out, step, stage.name)
    finally:
        bar.close()
        accelerator.end_training()
    return {"step": step, "losses": losses, "exports": exports, "checkpoint": checkpoint,
            "model": accelerator.unwrap_model(net).model}


def noise_generator(seed: int, micro_batch: int, rank: int, device) -> torch.Generator:
    import numpy as np

    state = int(np.random.SeedSequence([seed, micro_batch, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state & (2 ** 63 - 1))


def _append(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise TrainError(f"cannot write {path}: {e.strerror or e}") from None


def _export(accelerator, net, ema, params, out: Path, step: int, stage: str) -> list[Path]:
    accelerator.wait_for_everyone()
    written: list[Path] = []
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(net).model
        try:
            if ema is not None:  # export the EMA weights; training goes on with the live ones
                ema.store(params)
                ema.copy_to(params)
            written = export(model, out, step, stage)
        except ExportError as e:
            raise TrainError(str(e)) from None
        finally:
            if ema is not None:
                ema.restore(params)
    accelerator.wait_for_everyone()
    return written


# ---------------------------------------------------------------------------------------------
# Validation: a fixed source and driving clip through the offline pipeline
# ---------------------------------------------------------------------------------------------

def validation_clip(clips: ClipSet, frames: int):
    """(source frame, source landmarks, driving frames, driving landmarks): the first clip's
    first frame, driven by the first clip of another identity (itself if there is none)."""
    import numpy as np

    source_clip = 0
    others = clips.clips_of_other_identities(source_clip)
    driving_clip = others[0] if others else source_clip
    n = min(frames, clips.clips[driving_clip].frames)
    lms = clips.landmarks(driving_clip)
    return (clips.frame(source_clip, 0), np.asarray(clips.landmarks(source_clip)[0]),
            np.stack([clips.frame(driving_clip, i) for i in range(n)]), np.asarray(lms[:n]))


def motion_accuracy(rendered, driving_landmarks) -> dict:
    """Correlation of mouth opening, eye opening and head roll between the driving frames and
    the face mesh found on the rendered ones (NaN where too few faces are found)."""
    import numpy as np

    from ...face import FaceTracker, eye_opening, head_roll, mouth_opening

    found = []
    with FaceTracker(video=False) as tracker:
        for frame, lm in zip(rendered, driving_landmarks):
            got = tracker.detect(frame)
            if got is not None:
                found.append((got, lm))
    figures = {"faces_found": float(len(found)), "frames": float(len(rendered))}
    for name, measure in (("mouth", mouth_opening), ("eyes", eye_opening), ("roll", head_roll)):
        if len(found) < 3:
            figures[f"{name}_corr"] = float("nan")
            continue
        a = np.array([measure(g) for g, _ in found])
        b = np.array([measure(lm) for _, lm in found])
        figures[f"{name}_corr"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 1e-9 and b.std() > 1e-9 else float("nan")
    return figures


@torch.no_grad()
def validate(model: XPortraitModel, clips: ClipSet, config: TrainConfig, out: Path, step: int, ema=None,
             params=None) -> dict:
    import cv2
    import numpy as np

    from streamer.video import write_video

    from ...face import alignment_affine, best_reference_frame, head_box, transform_landmarks
    from ..pipeline import SamplerSettings, XPortraitPipeline
    from .pairs import local_image

    source, source_lm, driving, driving_lm = validation_clip(clips, config.validation_frames)
    size = source.shape[0]
    best = best_reference_frame(source_lm, list(driving_lm))
    affine = alignment_affine(head_box(source_lm), head_box(driving_lm[best]))
    aligned = np.stack([cv2.warpAffine(f, affine, (size, size), borderMode=cv2.BORDER_REPLICATE) for f in driving])
    aligned_lm = np.stack([transform_landmarks(lm, affine) for lm in driving_lm])
    local = np.stack([local_image(f, lm) for f, lm in zip(aligned, aligned_lm)])
    device, dtype = model.vae.device, next(model.vae.parameters()).dtype
    as_input = lambda a: (torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device, dtype)
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    was_training = model.training
    model.eval()
    try:
        settings = SamplerSettings(steps=config.validation_steps, window=min(16, model.config.motion_max_len))
        frames = XPortraitPipeline(model, settings)(as_input(source[None]), as_input(aligned), as_input(local))
    finally:
        model.train(was_training)
        if ema is not None:
            ema.restore(params)
    rendered = ((frames.float().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
    video = out / "validation" / f"step-{step:06d}.mp4"
    side = np.concatenate([aligned, rendered], axis=2)  # driving | rendered
    fps = clips.clips[0].fps if 0 < clips.clips[0].fps <= 240 else 25.0
    atomic_write(video, lambda p: write_video(p, side, fps=fps))
    figures = motion_accuracy(rendered, aligned_lm)
    figures["step"] = step
    figures["video"] = str(video)
    _append(out / "validation.jsonl", {k: None if isinstance(v, float) and math.isnan(v) else v  # JSON has no NaN
                                       for k, v in figures.items()})
    return figures
