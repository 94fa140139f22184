"""Public entry point for megatron-core: ``from mgup_dist.megatron import get_megatron_optimizer``.

See :mod:`mgup_dist.integrations.megatron` for how MGUP-AdamW replaces Adam inside
megatron-core's optimizer wrappers and distributed optimizer.
"""
from .integrations.megatron import (  # noqa: F401
    DROPPING_FORMATS,
    KEEPING_FORMATS,
    MGUP_KEYS,
    MGUP_OPTIMIZER_NAMES,
    build_distributed_layouts,
    get_megatron_optimizer,
)

__all__ = [
    "get_megatron_optimizer",
    "build_distributed_layouts",
    "MGUP_OPTIMIZER_NAMES",
    "MGUP_KEYS",
    "KEEPING_FORMATS",
    "DROPPING_FORMATS",
]
