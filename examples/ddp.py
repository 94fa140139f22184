"""MGUP-AdamW under DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp.py                 # CPU, gloo
    torchrun --nproc_per_node 8 examples/ddp.py --device cuda   # one process a GPU

Every rank holds every parameter whole, so the optimizer needs no layout.
``replicated()`` makes its first step check that all ranks use the same hyperparameters.
"""
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from _common import batch, init, model, parse_args, report
from mgup_dist import MGUPAdamW

args = parse_args(__doc__.splitlines()[0])
device = init(args.device)
net = DDP(model().to(device), device_ids=[device.index] if device.type != "cpu" else None)
opt = MGUPAdamW(net.parameters(), lr=1e-2, weight_decay=0.01, mask_ratio=0.5, alpha=2.0, gamma=0.5).replicated()
losses = []
for step in range(args.steps):
    x, y = batch(step, dist.get_rank(), device)
    loss = torch.nn.functional.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
report(losses, "ddp")
dist.destroy_process_group()
