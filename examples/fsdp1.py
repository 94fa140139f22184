"""MGUP-AdamW under FSDP1 (``FullyShardedDataParallel``), with original parameters.

    torchrun --nproc_per_node 2 examples/fsdp1.py               # CPU, gloo
    torchrun --nproc_per_node 8 examples/fsdp1.py --device cuda

With ``use_orig_params=True`` each parameter the optimizer holds is a 1-D piece of a
flat buffer that does not say which range of its tensor it is:
``attach_fsdp1_layouts(optimizer, model)`` tells it, once, on every rank (without it the
first step raises a ValueError naming this call).  With ``use_orig_params=False`` the
optimizer reads each FlatParameter's layout itself.
"""
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from _common import batch, init, model, parse_args, report
from mgup_dist import MGUPAdamW
from mgup_dist.integrations.fsdp import attach_fsdp1_layouts

args = parse_args(__doc__.splitlines()[0])
device = init(args.device)
net = FSDP(model(), use_orig_params=True, device_id=device)
opt = MGUPAdamW(net.parameters(), lr=1e-2, weight_decay=0.01, mask_ratio=0.5, alpha=2.0, gamma=0.5)
attach_fsdp1_layouts(opt, net)
losses = []
for step in range(args.steps):
    x, y = batch(step, dist.get_rank(), device)
    loss = torch.nn.functional.mse_loss(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
report(losses, "fsdp1")
dist.destroy_process_group()
