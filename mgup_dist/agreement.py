"""Cross-rank agreement of the hyperparameters: ranks that differ on what decides the
selection, the collectives or the update raise a ValueError naming the value and every
rank's setting, instead of drifting apart or waiting in mismatched collectives.

Per step (``check_agreement="step"``, the default) every rank of a distributed param group
enters one all-reduce of a fixed length (4 int64: a digest of every value and its
negation, MAX), whatever it holds, so ranks whose groups, rules or keys differ still enter
the same collective; only on a mismatch, which every rank reads from the same result, the
values are gathered to name the difference.  On CPU/gloo the result is read at once; on
accelerators ``LAG`` steps later (no host synchronisation).  ``"plan"``: checked only when
a plan is built (Megatron's ranks hold different param groups and enter no per-step check).
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .collectives import all_gather_object, all_reduce_max, world_size
from .layout import Layout, local_of
from .plan import collective_group

__all__ = ["AGREE", "AGREE_STEP", "LAG", "MODES", "agreement_group", "check_at_plan", "StepAgreement"]

#: what decides which collectives run, what is selected and how it is computed
AGREE = ("rule", "mode", "scope", "mask_ratio", "alpha", "gamma", "normalize", "convention", "chunk_elems", "backend",
         "compile", "foreach")
#: what shapes every update and may change between steps (a scheduler's lr)
AGREE_STEP = ("lr", "betas", "eps", "weight_decay", "maximize", "momentum", "nesterov", "ns_steps", "correct_bias")
#: accelerators: step t's result is read at step t + LAG (long finished by then: no stall)
LAG = 8
MODES = ("step", "plan")


def agreement_group(layouts: Sequence[Layout], replica_group) -> Tuple[bool, Any]:
    """(True, process group) when a param group must agree across ranks: its tensors are
    sharded (the layouts' group; the same on every rank) or the optimizer was declared
    replicated (``replicated()``: DDP).  Plain tensors otherwise: the optimizer may be
    rank-local (pipeline stages, references)."""
    if any(lay.collective or lay.group is not None for lay in layouts):
        return True, collective_group(layouts)
    if replica_group is not False:
        return True, replica_group
    return False, None


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _raise(cls_name: str, what: str, shown: str, also: str, where: str = "") -> None:
    raise ValueError(
        f"{cls_name}: the ranks disagree on {what}{where} ({shown}); every rank must use the same "
        f"{what.split('[')[0]} for a param group {also}"
    )


def check_at_plan(cls_name: str, group, layouts: List[Layout], replica_group, mode: str) -> None:
    """When a plan is built: one all_gather_object of what decides the plan (and, with
    ``mode="plan"``, of the step values) over the group's ranks."""
    if not _dist_ready():
        return
    # split tensors (Layout.collective: the same on every rank, so every rank builds this
    # plan now) or a declared replica group; a layout with only a group (Megatron: its ranks
    # hold different param groups and build their plans at different times) is not checked here
    if any(lay.collective for lay in layouts):
        pg = collective_group(layouts)
    elif replica_group is not False:
        pg = replica_group
    else:
        return
    if world_size(pg) == 1:
        return
    mine = {k: group.get(k) for k in AGREE}
    if mode == "plan":
        mine.update({k: group[k] for k in AGREE_STEP if k in group and not torch.is_tensor(group[k])})
    mine["split tensors (id, numel)"] = sorted({c for lay in layouts for c in lay.collective}, key=repr)
    if all(lay.group is None and not lay.collective for lay in layouts):
        mine["param shapes"] = [tuple(p.shape) for p in group["params"]]
    everyone = all_gather_object(mine, pg)
    for k in mine:
        vals = [d[k] for d in everyone]
        if any(v != vals[0] for v in vals):
            _raise(cls_name, k, ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals)),
                   "(it decides what is selected and which collectives run)")


def _host_value(v):
    """A value as compared across ranks: a one-element CPU tensor by its value (no device
    synchronisation), a device tensor not at all (``_device_lr`` carries it)."""
    if torch.is_tensor(v):
        return float(v) if v.device.type == "cpu" else None
    return v


class StepAgreement:
    """The per-step check of one optimizer: its lagged results on accelerators."""

    def __init__(self):
        self.pending: List[Tuple[int, tuple]] = []
        self.step = 0

    def __call__(self, cls_name: str, param_groups, layouts_of, replica_group, mode: str) -> None:
        import torch.distributed as dist

        if mode not in MODES:
            raise ValueError(f"check_agreement must be one of {MODES}, got {mode!r}")
        while self.pending and self.pending[0][0] <= self.step:
            _, args = self.pending.pop(0)
            self._compare(cls_name, *args)
        self.step += 1
        if mode != "step" or not _dist_ready():
            return
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # a traced or captured step replays without its host side: checked by the eager steps
        by_pg: Dict[int, Tuple[Any, Dict, List, torch.device]] = {}
        for i, group in enumerate(param_groups):
            if not group["params"]:
                continue
            needed, pg = agreement_group([layouts_of(p) for p in group["params"]], replica_group)
            if not needed or world_size(pg) == 1:
                continue
            device = local_of(group["params"][0]).device
            _, values, dev_lrs, _ = by_pg.setdefault(id(pg), (pg, {}, [], device))
            values[f"param group {i}"] = {k: _host_value(group[k]) for k in AGREE + AGREE_STEP if k in group}
            if torch.is_tensor(group["lr"]) and group["lr"].device.type != "cpu":
                dev_lrs.append((i, group["lr"]))
        for pg, values, dev_lrs, device in by_pg.values():
            digest = int.from_bytes(hashlib.blake2b(repr(sorted(values.items())).encode(), digest_size=8).digest(),
                                    "little", signed=True) >> 1   # 63 bits: its negation fits
            buf = torch.tensor([digest, -digest, 0, 0], dtype=torch.int64)
            if "gloo" in str(dist.get_backend(pg)):
                all_reduce_max(buf, pg)
                self._compare(cls_name, buf, values, pg)
                continue
            # pinned both ways and an event: the host never waits on the stream's newer work
            buf = buf.pin_memory().to(device, non_blocking=True)
            if dev_lrs:
                # device lrs, read nowhere on the host: one int64 of their bits, weighted by group
                bits = sum(lr.detach().to(torch.float64).view(torch.int64) * (2 * i + 1) for i, lr in dev_lrs)
                buf[2:].copy_(torch.stack([bits, -bits]))
            all_reduce_max(buf, pg)
            out = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
            out.copy_(buf, non_blocking=True)
            event = torch.get_device_module(device).Event()
            event.record()
            self.pending.append((self.step + LAG, (out, values, pg, event)))

    @staticmethod
    def _compare(cls_name: str, buf: torch.Tensor, values: Dict, pg, event=None) -> None:
        if event is not None:
            event.synchronize()   # recorded LAG steps ago: long complete
        top, neg_low, lr_top, lr_neg_low = buf.tolist()   # MAX of x and of -x: equal on all ranks iff top == low
        if top == -neg_low and lr_top == -lr_neg_low:
            return
        # rare path, entered by every rank of pg at once (they all read the same result)
        everyone = all_gather_object(values, pg)
        if lr_top != -lr_neg_low and all(v == everyone[0] for v in everyone):
            raise ValueError(f"{cls_name}: the ranks disagree on a device-tensor lr; every rank must step with the "
                             "same lr (also after a scheduler changes it), or the replicas / shards drift apart")
        absent = object()
        for gname in sorted({g for d in everyone for g in d}):
            per_rank = [d.get(gname, absent) for d in everyone]
            if any(v is absent for v in per_rank):
                shown = ", ".join(f"rank {r}: {'has it' if v is not absent else 'has none'}" for r, v in enumerate(per_rank))
                raise ValueError(f"{cls_name}: the ranks disagree on {gname} ({shown}); every rank must hold the same "
                                 "param groups of a sharded or replicated model")
            for k in AGREE + AGREE_STEP:   # what decides the most first: a rule, then its values
                vals = [v.get(k, absent) for v in per_rank]
                if any(x != vals[0] for x in vals):
                    shown = ", ".join(f"rank {r}: {'(none)' if x is absent else repr(x)}" for r, x in enumerate(vals))
                    _raise(cls_name, k, shown, "(also after a scheduler changes it), or the replicas / shards drift apart",
                           f" of {gname}")
