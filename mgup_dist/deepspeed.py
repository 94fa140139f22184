"""``import mgup_dist.deepspeed`` registers the MGUP optimizers with DeepSpeed.

After the import, a DeepSpeed config may name ``"optimizer": {"type": "MGUPAdamW", ...}``
(also ``CMGUPAdamW``, ``MGUPLion``, ``CMGUPLion``, ``MGUPMuon``, ``CMGUPMuon``) under any ZeRO
stage; see :mod:`mgup_dist.integrations.deepspeed`.
"""
from mgup_dist.integrations.deepspeed import (  # noqa: F401
    accepted_params,
    attach_layouts,
    build_optimizer,
    optimizer_names,
    register,
    zero_layouts,
)

register()
