"""Run by tests/test_train.py: the trainer itself, `train()` as `xportrait train` runs it, in
two processes on the CPU for two steps of the motion stage (accelerate joins them over gloo).
After each backward this looks at the gradients: DDP's must be the mean of what each rank's
own batch gives (computed again without syncing); after the run every rank's trained
parameters must be those rank 0 saved.

The two ranks are started by torchrun's own launcher (`elastic_launch`, as `torchrun
--standalone --nproc_per_node 2` configures it: a c10d rendezvous on a free local port, the
same RANK / WORLD_SIZE / MASTER_ADDR environment), forked from this process once it has
imported the trainer: the ranks skip the ~10 s import of torch, diffusers and mediapipe each
that `torchrun script.py` pays three times (the launcher and both ranks).

argv: DATA_DIR BASE OUT_DIR REPORT_JSON
"""

import json
import os
import sys
import uuid

import torch

torch.set_num_threads(1)

# Everything the ranks import, imported once here (the forked ranks inherit it).
import torch.utils.tensorboard  # noqa: E402,F401  (the run's logs)
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # noqa: E402

import engines.matte  # noqa: E402,F401  (the control images' person matte)
from engines.face import import_mediapipe  # noqa: E402
from engines.xportrait.train.config import build_config  # noqa: E402
from engines.xportrait.train.trainer import train  # noqa: E402

import_mediapipe()

steps = []


def check(accelerator, net, inputs, generator):
    trained = [p for p in net.parameters() if p.requires_grad]
    synced = [p.grad.clone() for p in trained]
    for p in trained:
        p.grad = None
    with accelerator.no_sync(net):  # this rank's own gradient, same noise
        accelerator.backward(net(**inputs, generator=generator))
    local = torch.cat([p.grad.flatten() for p in trained])
    for p, g in zip(trained, synced):  # the optimizer steps with DDP's gradient
        p.grad = g
    synced = torch.cat([g.flatten() for g in synced])
    mean = accelerator.gather(local[None]).mean(dim=0)
    steps.append({"grad_vs_mean": float((synced - mean).abs().max()), "grad_scale": float(mean.abs().max()),
                  "grad_vs_local": float((synced - local).abs().max())})


def rank(data: str, base: str, out: str, report: str) -> None:
    """One rank: what `torchrun train_ddp_check.py` ran as its script."""
    config = build_config(None, stage="motion", data=data, base=base, out=out, model="tiny", steps=2, workers=0,
                          lr=1e-3, warmup_steps=0, checkpoint_every=100)
    result = train(config, progress=False, after_backward=check)
    # (train() has closed the process group.) Every rank against what rank 0 saved at the end.
    saved = load_file(f"{out}/checkpoints/step-000002/model.safetensors")
    live = {"model." + k: v for k, v in result["model"].state_dict().items()}
    trained = {"model." + n for n, p in result["model"].named_parameters() if p.requires_grad}
    spread = max(float((live[k] - saved[k]).abs().max()) for k in trained)
    with open(f"{report}.rank{os.environ['RANK']}", "w") as f:
        json.dump({"ranks": int(os.environ["WORLD_SIZE"]), "steps": steps, "params_spread": spread,
                   "parameters": len(trained), "losses": [r["loss"] for r in result["losses"]]}, f)


if __name__ == "__main__":
    standalone = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, start_method="fork")
    elastic_launch(standalone, rank)(*sys.argv[1:5])
