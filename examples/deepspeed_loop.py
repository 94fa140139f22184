"""MGUP-AdamW named in a DeepSpeed JSON config, in a plain DeepSpeed training loop.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_loop.py     # CPU, gloo
    deepspeed --num_gpus 8 examples/deepspeed_loop.py --device cuda

``import mgup_dist.deepspeed`` registers the MGUP types, so ``"optimizer": {"type":
"MGUPAdamW", ...}`` builds ours inside ``deepspeed.initialize``, and after ZeRO wraps it
the optimizer learns which slice of each flat partition belongs to which tensor.  (A script
that cannot import it: launch it as ``torchrun -m mgup_dist.run script.py ...``.)
"""
import argparse
import os
import pathlib
import warnings

import torch
import torch.distributed as dist

from _common import batch, init, model, report

import mgup_dist.deepspeed  # noqa: F401  registers the MGUP optimizer types with DeepSpeed

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--deepspeed-config", default=str(pathlib.Path(__file__).with_name("deepspeed_zero2.json")))
p.add_argument("--device", default="cpu", help="cpu (default; gloo; set DS_ACCELERATOR=cpu), cuda or npu")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
args = p.parse_args()
if args.device == "cpu" and os.environ.get("DS_ACCELERATOR") != "cpu":
    raise SystemExit("deepspeed_loop.py: on CPU set DS_ACCELERATOR=cpu (DeepSpeed picks its accelerator at import)")

import deepspeed  # noqa: E402  after the check: DS_ACCELERATOR is read at import

device = init(args.device)
with warnings.catch_warnings():
    # DeepSpeed 0.19 gathers partitions with APIs torch 2.13 deprecates (a FutureWarning a rank)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    net = model().to(device)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=args.deepspeed_config)
    losses = []
    for step in range(args.steps):
        x, y = batch(step, dist.get_rank(), device)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
print_opt = type(engine.optimizer.optimizer).__name__
if dist.get_rank() == 0:
    print(f"deepspeed: {type(engine.optimizer).__name__} wrapping {print_opt}", flush=True)
report(losses, "deepspeed")
dist.destroy_process_group()
