"""Engines: every one meets `engines.base.Engine`. `create_engine` is the one way to get one;
`add_engine_arguments` / `engine_options` give every command the same engine flags."""

from __future__ import annotations

import argparse

from .base import DrivingFrame, Engine, EngineError, Rendered, SourcePortrait, Timings

ENGINES = ("warp", "xportrait")


def create_engine(name: str, size: int = 512, **options) -> Engine:
    """Build an engine by name; unknown names and bad options raise EngineError."""
    if size < 64 or size % 8:
        raise EngineError(f"size must be a multiple of 8 and at least 64, got {size}")
    if name == "warp":
        from .warp import WarpEngine

        return WarpEngine(size=size, **options)
    if name == "xportrait":
        from .xportrait.engine import XPortraitEngine, XPortraitStreamEngine

        if options.pop("stream", False):  # live: frame by frame, a few frames late
            return XPortraitStreamEngine(size=size, **options)
        return XPortraitEngine(size=size, **options)  # offline: the whole clip at once
    raise EngineError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the diffusion engine (the warp engine takes none)."""
    g = parser.add_argument_group("xportrait engine (--engine xportrait)")
    g.add_argument("--base", metavar="PATH", help="Stable Diffusion 1.5: a diffusers folder or one .safetensors/.ckpt")
    g.add_argument("--checkpoint", metavar="PATH", help="the released X-Portrait checkpoint (model_state-*.th)")
    g.add_argument("--lcm-lora", metavar="PATH", help="an LCM-LoRA for SD1.5, fused into the UNet (few-step sampling)")
    g.add_argument("--sampler", choices=("ddim", "lcm"),
                   help="default: lcm with --lcm-lora, else the released DDIM (30 steps, guidance 5)")
    g.add_argument("--steps", type=int, help="denoising steps (default: 30 DDIM as released; 4 with --lcm-lora)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance (default: 5 as released; 1 with --lcm-lora)")
    g.add_argument("--seed", type=int, default=999, help="noise seed (default: 999, as released)")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if present), cuda, cuda:1, cpu")
    g.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on a GPU, fp32 on a CPU")
    g.add_argument("--allow-hub", action="store_true",
                   help="let --base/--checkpoint/--lcm-lora name Hugging Face hub ids (downloads); default: local paths only")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle torch weights files fully, for one that holds Python objects besides tensors "
                        "(this can run code from the file: only for files you trust); default: tensors only")
    g.add_argument("--random-weights", action="store_true",
                   help="no weights: random ones, to measure cost (every output is labelled as such)")
    g.add_argument("--compile", action="store_true",
                   help="live engine: torch.compile the tick before capturing its CUDA graph (minutes of startup, "
                        "about twice the frame rate)")
    g.add_argument("--backend", choices=("torch", "onnx", "tensorrt"), default="torch",
                   help="live engine: run the modules with torch, or the graphs `xportrait export` wrote (--graphs)")
    g.add_argument("--graphs", metavar="DIR", help="exported graphs for --backend onnx|tensorrt")
    g.add_argument("--tiny-decoder", metavar="PATH",
                   help="live engine: decode with TAESD (a diffusers AutoencoderTiny folder; 'random' with --random-weights)")
    g.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="live engine: each frame also attends to the next K frames in flight, for K frames more "
                        "latency and (S+K)/S the work per frame (default: 0, causal)")
    g.add_argument("--model-size", choices=("sd15", "tiny"), default="sd15",
                   help="tiny: the same architecture a few channels wide (tests, demos with --random-weights)")


def engine_options(args: argparse.Namespace, live: bool = False) -> dict:
    """The keyword options of create_engine for args.engine, from add_engine_arguments' flags.
    `live`: for the streamer (frame by frame), where the xportrait engine streams."""
    if args.engine != "xportrait":
        given = [f for f in ("base", "checkpoint", "lcm_lora", "steps", "guidance") if getattr(args, f, None) is not None]
        if given or getattr(args, "random_weights", False):
            flags = ", ".join("--" + f.replace("_", "-") for f in given + (["random_weights"] if args.random_weights else []))
            raise EngineError(f"{flags}: only for --engine xportrait")
        return {}
    live_only = {"compile": args.compile, "tiny_decoder": args.tiny_decoder, "lookahead": args.lookahead}
    if not live and (any(live_only.values()) or args.backend != "torch"):
        raise EngineError("--compile, --tiny-decoder, --lookahead and --backend are for the live engine "
                          "(serve, bench --stream)")
    if args.backend != "torch" and not args.graphs:
        raise EngineError(f"--backend {args.backend} needs --graphs DIR (written by `xportrait export`)")
    return dict(base=args.base, checkpoint=args.checkpoint, lcm_lora=args.lcm_lora, sampler=args.sampler,
                steps=args.steps,
                guidance=args.guidance, seed=args.seed, device=args.device, dtype=args.dtype,
                random_weights=args.random_weights, model_size=args.model_size, allow_hub=args.allow_hub,
                trust_checkpoint=args.trust_checkpoint,
                **({"stream": True, **live_only, "backend": args.backend, "graphs": args.graphs} if live else {}))


__all__ = ["DrivingFrame", "Engine", "EngineError", "Rendered", "SourcePortrait", "Timings",
           "ENGINES", "create_engine", "add_engine_arguments", "engine_options"]
