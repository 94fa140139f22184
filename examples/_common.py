"""What the examples share: a device from ``--device`` and a tiny regression task.

Not part of the package; each example imports it from its own directory.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from mgup_dist.device import comm_backend, resolve_device, set_device_for_local_rank


def parse_args(description: str, steps: int = 20) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu (default; gloo), cuda or npu: one process per device")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    return p.parse_args()


def init(device_spec: str) -> torch.device:
    """The process group (under torchrun; a 1-process group otherwise) and this rank's device."""
    device = resolve_device(device_spec)
    if device.type != "cpu":
        set_device_for_local_rank(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(comm_backend(device))
    return device


def model(seed: int = 0) -> torch.nn.Module:
    """13 -> 64 -> 5 MLP: its tensors do not line up with any sharding boundary."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))


def batch(step: int, rank: int, device, n: int = 16):
    """A fixed regression target (y = sin(x W)), different samples on every rank."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 13, generator=g)
    w = torch.randn(13, 5, generator=torch.Generator().manual_seed(7))
    return x.to(device), torch.sin(x @ w).to(device)


def report(losses, name: str) -> None:
    if dist.get_rank() == 0:
        print(f"{name}: {dist.get_world_size()} rank(s), loss {losses[0]:.4f} -> {losses[-1]:.4f} "
              f"after {len(losses)} steps", flush=True)
