"""mgup_dist: the MGUP optimizer family (MGUP-AdamW, -Lion, -Muon and their cautious
forms) for single-device and sharded training (FSDP, DeepSpeed ZeRO, Megatron-core).

    from mgup_dist import MGUPAdamW
    opt = MGUPAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)   # top-K per tensor, tau = 0.5

Tree: ``functional`` (the math on local tensors), ``selection`` (the K-th score per
scope, local and distributed), ``layout`` (how local buffers map to original tensors),
``optim`` (the optimizer classes), ``device`` (cpu / cuda / npu), ``integrations/``
(layouts from FSDP, DeepSpeed, Megatron), ``train/`` (the LLaMA-on-C4 recipe).
"""
from .layout import Layout, Segment, whole_layout
from .optim import (
    MODES,
    OPTIMIZERS,
    CMGUPAdamW,
    CMGUPLion,
    CMGUPMuon,
    MGUPAdamW,
    MGUPLion,
    MGUPMuon,
    SparseGradientError,
)
from .selection import SCOPES

__version__ = "0.1.0"

__all__ = [
    "MGUPAdamW",
    "MGUPLion",
    "MGUPMuon",
    "CMGUPAdamW",
    "CMGUPLion",
    "CMGUPMuon",
    "OPTIMIZERS",
    "MODES",
    "SCOPES",
    "Layout",
    "Segment",
    "whole_layout",
    "SparseGradientError",
]
