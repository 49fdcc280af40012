"""`xportrait train --stage STAGE --data DIR --base SD15 [--init CKPT] --out DIR`.

Trains one X-Portrait stage (appearance, motion, temporal, causal) with accelerate; runs
unchanged under `accelerate launch` on several GPUs or nodes. The many knobs live in a
config file (`--config run.toml`, keys as engines/xportrait/train/config.py's TrainConfig);
flags override it. Exit codes: 0 done, 2 bad options or inputs, 1 a run that failed.
"""

from __future__ import annotations

import argparse
import sys

from engines.xportrait.train.stages import STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=tuple(STAGES), help="what to train (default: appearance)")
    parser.add_argument("--data", metavar="DIR", help="a training set made by `xportrait prepare-data`")
    parser.add_argument("--base", metavar="SD15", help="Stable Diffusion 1.5: a diffusers folder or one ldm file")
    parser.add_argument("--init", metavar="CKPT", help="start from this released-layout checkpoint "
                                                       "(the previous stage's export, or the released one)")
    parser.add_argument("--out", metavar="DIR", help="run folder: checkpoints, exports, logs")
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of training options")
    parser.add_argument("--resume", metavar="latest|DIR", help="continue from a checkpoint of this run")
    parser.add_argument("--steps", type=int, help="optimizer steps in all")
    parser.add_argument("--stop-after", type=int, help="stop this run after N steps (resume it later)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--workers", type=int, help="data-loader worker processes")
    parser.add_argument("--cached-controls", action="store_true", default=None,
                        help="read the control images `prepare-data --control-cache` rendered (faster loader; "
                             "no face models needed on the training machine)")
    parser.add_argument("--model", choices=("sd15", "tiny"), help="architecture size (tiny: tests)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from engines.xportrait.train.config import ConfigError, build_config
    from engines.xportrait.train.trainer import TrainError, train

    try:
        config = build_config(args.config, stage=args.stage, data=args.data, base=args.base, init=args.init,
                              out=args.out, resume=args.resume, steps=args.steps, stop_after=args.stop_after,
                              batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                              mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                              workers=args.workers, cached_controls=args.cached_controls,
                              model=args.model, seed=args.seed)
    except ConfigError as e:
        print(f"xportrait train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(config, progress=not args.quiet)
    except TrainError as e:
        print(f"xportrait train: {e}", file=sys.stderr)
        return 2
    last = result["losses"][-1]["loss"] if result["losses"] else float("nan")
    print(f"{config.stage}: step {result['step']}, loss {last:.4f}")
    for path in result["exports"]:
        print(f"exported {path}")
    return 0
