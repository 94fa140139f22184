"""Spawned workers for tests/test_megatron.py (real megatron-core 0.16, gloo, CPU).

Each worker installs tests/megatron_cpu_shim.py first (what it replaces is listed
there), builds a tiny model under megatron-core's DistributedDataParallel and the
optimizer through ``mgup_dist.megatron.get_megatron_optimizer``, and returns plain
data (floats, lists, CPU tensors) for the parent to assert on.

The tiny model is chosen so that one tensor is split across two data-parallel ranks.
megatron's param-and-grad buffer holds the params in reverse order, each start padded
to 64 elements, the bucket padded to a multiple of 128:

    l2.bias [0, 4)   l2.weight [64, 320)   l1.bias [320, 384)   l1.weight [384, 896)

so at DP=2 (448 elements a rank) l1.weight (64x8 = 512) is cut at 448: elements
[0, 64) on rank 0 and [64, 512) on rank 1.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

IN, HID, OUT = 8, 64, 4
SPLIT_PARAM = "l1.weight"
LR, WD = 1e-2, 0.1


def _quiet():
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)


def setup_megatron():
    import megatron_cpu_shim

    megatron_cpu_shim.install()
    _quiet()
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _tiny_class():
    from megatron.core.transformer.module import MegatronModule

    class Tiny(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.l1 = torch.nn.Linear(IN, HID)
            self.l2 = torch.nn.Linear(HID, OUT)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

    return Tiny


def transformer_config(bf16: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=IN, num_attention_heads=1, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def _wide_class():
    """For DP=3: buffer ``b [0, 700)  w [704, 1216)`` padded to 1536, 512 a rank.  The
    no-decay group (``b``, 1-D) is split over ranks 0/1 and rank 2 holds none of it; the
    decay group (``w``) is split over ranks 1/2 and rank 0 holds none of it."""
    from megatron.core.transformer.module import MegatronModule

    class Wide(MegatronModule):
        def __init__(self, config):
            super().__init__(config)
            self.w = torch.nn.Parameter(torch.randn(IN, 64) * 0.3)
            self.b = torch.nn.Parameter(torch.randn(700) * 0.3)

        def forward(self, x):
            h = torch.tanh(x @ self.w)  # (n, 64)
            return h[:, :OUT] + (self.b.view(7, 100) ** 2).mean()

    return Wide


def make_module(bf16: bool, seed: int = 0, kind: str = "tiny"):
    """The bare module (no DDP), identical on every rank for a given seed."""
    torch.manual_seed(seed)
    m = (_tiny_class() if kind == "tiny" else _wide_class())(transformer_config(bf16))
    return m.bfloat16() if bf16 else m


def wrap_ddp(module, bf16: bool, distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=distributed_optimizer, grad_reduce_in_fp32=True
    )
    return DistributedDataParallel(transformer_config(bf16), ddp_config, module)


def optimizer_config(bf16: bool, distributed_optimizer: bool, name: str = "mgup_adamw", clip_grad: float = 0.0):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=name, lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer, clip_grad=clip_grad,
    )


def build(bf16: bool, distributed_optimizer: bool = True, seed: int = 0, mgup=None, name="mgup_adamw",
          clip_grad: float = 0.0, kind: str = "tiny"):
    from mgup_dist.megatron import get_megatron_optimizer

    model = wrap_ddp(make_module(bf16, seed, kind), bf16, distributed_optimizer)
    opt = get_megatron_optimizer(
        optimizer_config(bf16, distributed_optimizer, name, clip_grad), [model],
        mgup=dict(mask_ratio=0.5, alpha=2.0, gamma=0.5) if mgup is None else mgup,
    )
    return model, opt


def batch(step: int, rank: int = 0, bf16: bool = False, n: int = 6):
    """Inputs and regression targets; ``rank`` changes the data (0 for all: identical)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(7))
    y = torch.sin(x @ w)
    dt = torch.bfloat16 if bf16 else torch.float32
    return x.to(dt), y.to(dt)


def loss_fn(module, x, y):
    return (module(x).float() - y.float()).pow(2).mean()


def train_step(model, opt, x, y):
    model.zero_grad_buffer()
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    model.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    return loss.item()


def named_params(model):
    """Full model params (after the step's all-gather every rank holds them whole)."""
    return {n.replace("module.", "", 1): p.detach().float().clone() for n, p in model.named_parameters()}


def main_param_pieces(opt):
    """{name: (param_range_start, fp32 main shard)} of a DistributedOptimizer's shards."""
    dopt = opt.chained_optimizers[0]
    names = {p: n for n, p in dopt.model_chunks[0].module.named_parameters()}
    out = {}
    for p, (gi, go) in dopt.model_param_group_index_map.items():
        rng = dopt._get_model_param_range_map(p)["param"]
        out[names[p]] = (rng.start, dopt.optimizer.param_groups[gi]["params"][go].detach().clone())
    return out


def reference(bf16: bool, mgup: dict, cls_name="MGUPAdamW", kind: str = "tiny"):
    """Single-device MGUP on fp32 copies of the same initial params (the whole tensors)."""
    import mgup_dist

    module = make_module(bf16, 0, kind)  # bf16: same rounded initial values as the DDP model
    fp32 = {n: p.detach().float().clone().requires_grad_(False) for n, p in module.named_parameters()}
    opt = mgup_dist.OPTIMIZERS[cls_name](list(fp32.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD,
                                         **mgup)
    return module, fp32, opt


def reference_step(module, fp32, opt, x, y, dp: int = 1):
    """Grads of the bare module (same dtype as the DDP model), then the fp32 MGUP step.

    ``dp``: megatron's DDP averages as ``sum_r(g_r * (1/dp))``; with identical data on
    every rank that is ``g*(1/dp)`` added ``dp`` times, exactly ``g`` only for dp = 1, 2,
    so the reference forms the same sum (every order of adding equal terms rounds alike)."""
    module.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(fp32[n].to(p.dtype))
    loss_fn(module, x, y).backward()
    for n, p in module.named_parameters():
        g = p.grad.detach().float()
        if dp > 1:
            part = g * (1.0 / dp)
            g = part.clone()
            for _ in range(dp - 1):
                g += part
        fp32[n].grad = g
    opt.step()


def max_diff(a: dict, b: dict) -> dict:
    return {k: float(abs(_np(a[k]) - _np(b[k])).max()) for k in a}


def _np(t):
    return t.numpy() if isinstance(t, torch.Tensor) else t


def plain(obj):
    """Results as numpy / builtins: tensors sent back through the result queue travel as
    shared-memory handles, which stalled once the sender had exited."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().float().numpy().copy()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


# ------------------------------------------------------------------ run A
def equivalence_and_training(rank, world_size):
    """Distributed (and plain) megatron optimizers vs single-device MGUP on identical
    gradients, plus short training runs with per-rank data."""
    setup_megatron()
    mgup = dict(mask_ratio=0.5, alpha=2.0, gamma=0.5)
    out = {}
    for bf16 in (False, True):
        for dist_opt, scope in ((True, "tensor"), (True, "shard"), (False, "tensor")):
            model, opt = build(bf16, dist_opt, mgup=dict(mgup, scope=scope))
            mod, fp32, ref = reference(bf16, dict(mgup, scope="tensor"))
            diffs, main_diffs = [], []
            for step in range(3):
                x, y = batch(step, 0, bf16)  # identical data on every rank
                train_step(model, opt, x, y)
                reference_step(mod, fp32, ref, x, y, dp=world_size)
                expect = {n: t.to(torch.bfloat16).float() if bf16 else t for n, t in fp32.items()}
                diffs.append(max_diff(named_params(model), expect))
                if dist_opt:
                    md = {}
                    for n, (start, shard) in main_param_pieces(opt).items():
                        md[n] = (shard - fp32[n].reshape(-1)[start:start + shard.numel()]).abs().max().item()
                    main_diffs.append(md)
            key = ("bf16" if bf16 else "fp32", "dist" if dist_opt else "plain", scope)
            out[key] = dict(diffs=diffs, main_diffs=main_diffs)
            if dist_opt and scope == "tensor":
                dopt = opt.chained_optimizers[0]
                inner = dopt.optimizer
                lay = {}
                names = {p: n for n, p in dopt.model_chunks[0].module.named_parameters()}
                for p, (gi, go) in dopt.model_param_group_index_map.items():
                    L = inner.layout_of(inner.param_groups[gi]["params"][go])
                    s = L.segments[0]
                    lay[names[p]] = (s.global_start, s.length, s.global_numel, L.collective)
                out[key]["layouts"] = lay
                out[key]["inner"] = type(inner).__name__
                out[key]["wrapper"] = type(dopt).__name__
                out[key]["step"] = float(next(iter(inner.state.values()))["step"])
    # Training with different data per rank: fp32 and bf16, top-K and cautious.
    train = {}
    for bf16 in (False, True):
        for name in ("mgup_adamw", "cmgup_adamw"):
            model, opt = build(bf16, True, seed=3, name=name, mgup={}, clip_grad=1.0)
            losses = [train_step(model, opt, *batch(step % 4, rank, bf16, n=16)) for step in range(30)]
            finite = all(torch.isfinite(p).all().item() for p in model.parameters())
            train[("bf16" if bf16 else "fp32", name)] = dict(losses=losses, finite=finite)
    out["train"] = train
    return plain(out)


# ------------------------------------------------------------------ checkpoints
def _allow_writer_processes():
    """megatron's torch_dist writer (FileSystemWriterAsync) forks writer processes and
    starts a multiprocessing Manager; tests/dist_utils.py runs ranks as daemonic processes,
    which Python forbids to have children.  The rank is a test process that we join
    anyway, so mark it non-daemonic (harness matter, nothing of megatron is changed)."""
    import multiprocessing as mp

    mp.current_process()._config["daemon"] = False


def save_checkpoint(model, opt, ckpt_dir, fmt="dp_reshardable"):
    from megatron.core import dist_checkpointing

    _allow_writer_processes()
    os.makedirs(ckpt_dir, exist_ok=True)
    model_sd = model.module.sharded_state_dict()
    sd = {"model": model_sd,
          "optimizer": opt.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": fmt})}
    dist_checkpointing.save(sd, ckpt_dir)


def load_checkpoint(model, opt, ckpt_dir, fmt="dp_reshardable"):
    from megatron.core import dist_checkpointing

    _allow_writer_processes()
    model_sd = model.module.sharded_state_dict()
    sd = {"model": model_sd,
          "optimizer": opt.sharded_state_dict(model_sd, is_loading=True,
                                              metadata={"distrib_optim_sharding_type": fmt})}
    loaded = dist_checkpointing.load(sd, ckpt_dir)
    model.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def optimizer_state(opt):
    """{name: {key: (param_range_start, tensor)}} of every shard's state, plus its main param."""
    dopt = opt.chained_optimizers[0]
    names = {p: n for n, p in dopt.model_chunks[0].module.named_parameters()}
    out = {}
    for p, (gi, go) in dopt.model_param_group_index_map.items():
        shard = dopt.optimizer.param_groups[gi]["params"][go]
        start = dopt._get_model_param_range_map(p)["param"].start
        st = {k: (start, v.detach().clone()) for k, v in dopt.optimizer.state[shard].items() if k != "step"}
        st["param"] = (start, shard.detach().clone())
        st["step"] = (0, dopt.optimizer.state[shard]["step"].detach().clone())
        out[names[p]] = st
    return out


def _steps(model, opt, bf16, steps):
    for step in steps:
        train_step(model, opt, *batch(step, 0, bf16))  # identical data on every rank


def checkpoint_roundtrips(rank, world_size, ckpt_root):
    """:func:`checkpoint_roundtrip` for fp32 and bf16 in one spawn ({dtype: result})."""
    return {dt: checkpoint_roundtrip(rank, world_size, os.path.join(ckpt_root, dt), dt == "bf16")
            for dt in ("fp32", "bf16")}


def checkpoint_loads(rank, world_size, ckpt_root):
    """:func:`checkpoint_load_only` for fp32 and bf16 in one spawn."""
    return {dt: checkpoint_load_only(rank, world_size, os.path.join(ckpt_root, dt), dt == "bf16")
            for dt in ("fp32", "bf16")}


def checkpoint_roundtrip(rank, world_size, ckpt_dir, bf16):
    """Train 2 steps, save (dp_reshardable), train 2 more; a fresh model + optimizer (other
    init) loads the checkpoint and trains the same 2 steps: returns both for comparison.
    Then the format guard: with a custom state key, dropping formats raise and
    dp_reshardable round-trips it."""
    setup_megatron()
    model, opt = build(bf16, True)
    _steps(model, opt, bf16, (0, 1))
    save_checkpoint(model, opt, ckpt_dir)
    at_save = named_params(model)
    _steps(model, opt, bf16, (2, 3))
    cont, cont_state = named_params(model), optimizer_state(opt)

    model2, opt2 = build(bf16, True, seed=5)
    fresh = named_params(model2)
    load_checkpoint(model2, opt2, ckpt_dir)
    loaded = named_params(model2)
    step_loaded = float(next(iter(opt2.chained_optimizers[0].optimizer.state.values()))["step"])
    _steps(model2, opt2, bf16, (2, 3))
    resumed, resumed_state = named_params(model2), optimizer_state(opt2)
    step_resumed = float(next(iter(opt2.chained_optimizers[0].optimizer.state.values()))["step"])

    # Format guard, with a state key beyond Adam's (as a variant with extra state would have).
    guard = {}
    inner = opt.chained_optimizers[0].optimizer
    for fmt in ("fully_reshardable", "dp_zero_gather_scatter"):
        try:
            opt.sharded_state_dict(model.module.sharded_state_dict(), metadata={"distrib_optim_sharding_type": fmt})
            guard[fmt + "_plain"] = "ok"
        except ValueError as e:  # must not raise with Adam's keys only
            guard[fmt + "_plain"] = str(e)
    for p in [p for g in inner.param_groups for p in g["params"]]:
        inner.state[p]["mgup_probe"] = torch.arange(p.numel(), dtype=torch.float32) + 1000 * rank
    for fmt in ("fully_reshardable", "dp_zero_gather_scatter"):
        try:
            opt.sharded_state_dict(model.module.sharded_state_dict(), metadata={"distrib_optim_sharding_type": fmt})
            guard[fmt] = None
        except ValueError as e:
            guard[fmt] = str(e)
    probe_dir = os.path.join(ckpt_dir + "_probe")
    save_checkpoint(model, opt, probe_dir)
    inner2 = opt2.chained_optimizers[0].optimizer
    for p in [p for g in inner2.param_groups for p in g["params"]]:
        inner2.state[p]["mgup_probe"] = torch.zeros(p.numel())
    load_checkpoint(model2, opt2, probe_dir)
    probe_ok = all(
        torch.equal(inner2.state[p2]["mgup_probe"], inner.state[p1]["mgup_probe"])
        for g1, g2 in zip(inner.param_groups, inner2.param_groups) for p1, p2 in zip(g1["params"], g2["params"])
    )
    return plain(dict(at_save=at_save, cont=cont, cont_state=cont_state, fresh=fresh, loaded=loaded,
                      step_loaded=step_loaded, step_resumed=step_resumed, resumed=resumed,
                      resumed_state=resumed_state, guard=guard,
                      probe_ok=probe_ok))


def checkpoint_load_only(rank, world_size, ckpt_dir, bf16):
    """Load a checkpoint saved at another data-parallel size and train the same 2 steps."""
    setup_megatron()
    model, opt = build(bf16, True, seed=5)
    load_checkpoint(model, opt, ckpt_dir)
    loaded = named_params(model)
    step_loaded = float(next(iter(opt.chained_optimizers[0].optimizer.state.values()))["step"])
    _steps(model, opt, bf16, (2, 3))
    return plain(dict(loaded=loaded, step_loaded=step_loaded, resumed=named_params(model),
                      resumed_state=optimizer_state(opt)))


# ------------------------------------------------------------------ DP=3
def three_ranks(rank, world_size, ckpt_root):
    """DP=3: the placeholder case below, and loading the DP=2 fp32 checkpoint."""
    out = three_ranks_placeholder(rank, world_size)
    out["load"] = checkpoint_load_only(rank, world_size, os.path.join(ckpt_root, "fp32"), False)
    return out


def three_ranks_placeholder(rank, world_size):
    """DP=3, where a rank holds no param of a param group whose tensors are split among
    the other ranks: it must still enter that group's selection all-reduce (through an
    empty placeholder param) and the result must equal the single-device step."""
    setup_megatron()
    mgup = dict(mask_ratio=0.5, alpha=2.0, gamma=0.5)
    model, opt = build(False, True, mgup=mgup, kind="wide")
    mod, fp32, ref = reference(False, mgup, kind="wide")
    diffs = []
    for step in range(2):
        x, y = batch(step, 0, False)
        train_step(model, opt, x, y)
        reference_step(mod, fp32, ref, x, y, dp=world_size)
        diffs.append(max_diff(named_params(model), fp32))
    inner = opt.chained_optimizers[0].optimizer
    groups = [
        dict(n_params=len(g["params"]), n_placeholders=sum(p.numel() == 0 for p in g["params"]),
             collective=sorted({c for p in g["params"] for c in inner.layout_of(p).collective}))
        for g in inner.param_groups
    ]
    return plain(dict(diffs=diffs, groups=groups))


# ------------------------------------------------------------------ apex / TE FusedAdam
def _bind_te_standin():
    """Transformer Engine cannot stand in by import path alone on CPU: once
    ``import transformer_engine`` succeeds, megatron-core 0.16 treats all of TE as present
    (``fp8_utils`` imports ``transformer_engine.pytorch.tensor.QuantizedTensor`` and
    ``megatron.core.extensions.transformer_engine`` at import time).  So, after a plain
    import, bind exactly what the TE branch of megatron's ``try`` would have bound:
    ``optimizer.Adam`` / ``SGD`` and ``USING_PYTORCH_OPTIMIZER=False`` in
    ``megatron.core.optimizer``; ``Adam``, ``USING_TE_OPTIMIZER=True`` and
    ``HAVE_APEX_OR_TE=True`` in ``distrib_optimizer``.  The stand-in module itself is
    registered under ``transformer_engine.pytorch.optimizers`` only after megatron's
    import (see tests/fused_adam_standins.py)."""
    import fused_adam_standins as S
    import megatron.core.optimizer as mopt
    import megatron.core.optimizer.distrib_optimizer as dmod

    cls = S.install("te", allow_after_megatron=True)
    mopt.Adam, mopt.SGD, mopt.USING_PYTORCH_OPTIMIZER = cls, sys.modules[S.TE_MODULE].FusedSGD, False
    dmod.Adam, dmod.USING_TE_OPTIMIZER, dmod.USING_APEX_OPTIMIZER, dmod.HAVE_APEX_OR_TE = cls, True, False, True
    return cls


def fused_adam_equivalence(rank, world_size, which):
    """megatron-core builds apex's ("apex": stand-in installed under ``apex.optimizers``
    before megatron is imported) or TE's FusedAdam ("te", see :func:`_bind_te_standin`);
    MGUP must replace it, and the step must equal the single-device step (fp32 and bf16,
    distributed and plain optimizer, 3 steps)."""
    import fused_adam_standins as S

    cls = S.install("apex") if which == "apex" else None
    setup_megatron()
    if which == "te":
        cls = _bind_te_standin()
    from megatron.core.optimizer import get_megatron_optimizer as megatron_get

    # Without MGUP megatron-core itself picks the stand-in (so the path below is real).
    base = megatron_get(optimizer_config(False, True, "adam"), [wrap_ddp(make_module(False), False, True)])
    out = {"megatron_builds": type(base.chained_optimizers[0].optimizer) is cls}
    mgup = dict(mask_ratio=0.5, alpha=2.0, gamma=0.5)
    for bf16 in (False, True):
        for dist_opt in (True, False):
            model, opt = build(bf16, dist_opt, mgup=dict(mgup, scope="tensor"))
            mod, fp32, ref = reference(bf16, dict(mgup, scope="tensor"))
            diffs = []
            for step in range(3):
                x, y = batch(step, 0, bf16)
                train_step(model, opt, x, y)
                reference_step(mod, fp32, ref, x, y, dp=world_size)
                expect = {n: t.to(torch.bfloat16).float() if bf16 else t for n, t in fp32.items()}
                diffs.append(max_diff(named_params(model), expect))
            inner = [type(s.optimizer).__name__ for s in opt.chained_optimizers]
            out[("bf16" if bf16 else "fp32", "dist" if dist_opt else "plain")] = dict(diffs=diffs, inner=inner)
    return plain(out)


def fused_adam_checkpoint(rank, world_size, ckpt_dir):
    """:func:`checkpoint_roundtrip` (fp32) with apex's FusedAdam as megatron's Adam: with
    apex or TE installed megatron's DistributedOptimizer keeps ``step`` in the param
    groups (``HAVE_APEX_OR_TE`` branches of ``state_dict`` / ``load_state_dict``), not in
    each param's state as for torch's AdamW."""
    import fused_adam_standins as S

    S.install("apex")
    out = checkpoint_roundtrip(rank, world_size, ckpt_dir, False)
    import megatron.core.optimizer.distrib_optimizer as dmod

    out["apex_branch"] = bool(dmod.USING_APEX_OPTIMIZER and dmod.HAVE_APEX_OR_TE)
    return out
