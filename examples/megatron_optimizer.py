"""MGUP-AdamW through megatron-core's ``get_megatron_optimizer``, with the distributed optimizer.

    torchrun --nproc_per_node 8 examples/megatron_optimizer.py            # GPUs (nccl)

megatron-core 0.16 needs CUDA: its gradient buffers and optimizers call ``torch.cuda``
directly, so this script does not run on CPU as it is.  The test suite runs it on 2 CPU
ranks (``--device cpu``, gloo) under a shim that only exists in the tests
(``tests/megatron_cpu_shim.py``, which maps those CUDA calls to the CPU).

``mgup_dist.megatron.get_megatron_optimizer`` takes megatron's own arguments plus
``mgup=dict(...)``; megatron builds its Adam and wrappers as usual and each wrapper's inner
Adam becomes ``MGUPAdamW`` over the same parameters, each shard knowing its range of its
tensor.  Drive it like megatron's Adam.
"""
import argparse
import warnings

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from _common import batch, init, report
from mgup_dist.megatron import get_megatron_optimizer

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--device", default="cuda", help="cuda (default); cpu only under the test suite's shim")
p.add_argument("--steps", type=int, default=20)
args = p.parse_args()
# megatron-core 0.16 reduces and gathers with torch.distributed APIs that torch 2.13 deprecates
# (a FutureWarning on every rank); only those two are silenced
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        "deprecated", category=FutureWarning)
device = init(args.device)
parallel_state.initialize_model_parallel()   # data parallel over every rank


class MLP(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        self.l1 = torch.nn.Linear(13, 64)
        self.l2 = torch.nn.Linear(64, 5)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


config = TransformerConfig(num_layers=1, hidden_size=13, num_attention_heads=1)
torch.manual_seed(0)
model = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                MLP(config).to(device))
opt = get_megatron_optimizer(
    OptimizerConfig(optimizer="mgup_adamw", lr=1e-2, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999,
                    use_distributed_optimizer=True, clip_grad=1.0),
    [model], mgup=dict(mask_ratio=0.5, alpha=2.0, gamma=0.5, scope="tensor"))
losses = []
for step in range(args.steps):
    model.zero_grad_buffer()
    opt.zero_grad()
    x, y = batch(step, dist.get_rank(), device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    model.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok, "megatron skipped the step"
    losses.append(loss.item())
report(losses, "megatron")
dist.destroy_process_group()
