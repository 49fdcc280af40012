"""Run by tests/test_train.py under `accelerate launch --num_processes 2 --cpu` (gloo): one
stage's training step on each rank, with the trainer's own pieces, checking that DDP
averages the gradients of the trained modules and keeps the ranks' parameters equal.

argv: DATA_DIR OUT_JSON
"""

import json
import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

from engines.xportrait.config import XPortraitConfig  # noqa: E402
from engines.xportrait.loading import random_model  # noqa: E402
from engines.xportrait.train.data import ClipSet  # noqa: E402
from engines.xportrait.train.dataset import SampleSpec, TrainingSamples  # noqa: E402
from engines.xportrait.train.stages import STAGES, StageForward, freeze_for  # noqa: E402


def main(data: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    stage = STAGES["motion"]
    model = random_model(XPortraitConfig.tiny(), seed=accelerator.process_index)  # ranks start apart...
    params = freeze_for(model, stage)
    samples = TrainingSamples(ClipSet(data), SampleSpec(frames=1), seed=3, length=8)
    loader = torch.utils.data.DataLoader(samples, batch_size=1)
    net = StageForward(model, stage)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)  # ...DDP broadcasts rank 0's
    inner = accelerator.unwrap_model(net)
    names = [n for n, p in inner.named_parameters() if p.requires_grad]
    trained = [p for p in inner.parameters() if p.requires_grad]
    report = {"ranks": accelerator.num_processes, "steps": []}
    for step, batch in enumerate(loader):
        if step == 1:  # one step: the gradients, and the parameters after it
            break
        inputs = {k: batch[k] for k in ("source", "target", "control", "local", "uncond")}
        torch.manual_seed(100 + step)  # the same noise and timestep on both ranks: only the data differs
        with accelerator.no_sync(net):  # this rank's own gradient
            loss = net(**inputs)
            accelerator.backward(loss)
        local = torch.cat([p.grad.flatten() for p in trained]).clone()
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        loss = net(**inputs)
        accelerator.backward(loss)  # synchronised
        synced = torch.cat([p.grad.flatten() for p in trained])
        mean = accelerator.gather(local[None]).mean(dim=0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flat = torch.cat([p.detach().flatten() for p in trained])
        everyone = accelerator.gather(flat[None])
        report["steps"].append({
            "indices": accelerator.gather(batch["index"]).tolist(),
            "grad_vs_mean": float((synced - mean).abs().max()),
            "grad_scale": float(mean.abs().max()),
            "grad_vs_local": float((synced - local).abs().max()),
            "params_spread": float((everyone - everyone[0]).abs().max()),
            "params": len(names),
        })
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(report, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
