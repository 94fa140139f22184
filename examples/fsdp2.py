"""MGUP-AdamW under FSDP2 (``fully_shard``).

    torchrun --nproc_per_node 2 examples/fsdp2.py               # CPU, gloo
    torchrun --nproc_per_node 8 examples/fsdp2.py --device cuda

Each parameter is a DTensor sharded on dim 0; the optimizer reads that layout from the
DTensor itself, so top-K runs over each whole tensor (as on one device) with nothing to
attach.  Build the optimizer after ``fully_shard``.
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from _common import batch, init, model, parse_args, report
from mgup_dist import MGUPAdamW

args = parse_args(__doc__.splitlines()[0])
device = init(args.device)
mesh = init_device_mesh(device.type, (dist.get_world_size(),))
net = model().to(device)
for layer in net:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(net, mesh=mesh)
opt = MGUPAdamW(net.parameters(), lr=1e-2, weight_decay=0.01, mask_ratio=0.5, alpha=2.0, gamma=0.5)
losses = []
for step in range(args.steps):
    x, y = batch(step, dist.get_rank(), device)
    loss = torch.nn.functional.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
report(losses, "fsdp2")
dist.destroy_process_group()
