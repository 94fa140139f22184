"""Worker functions for the DeepSpeed tests (spawned by ``dist_utils.run_distributed``).

Each worker batches many checks into one spawned run: starting processes and importing
DeepSpeed costs more than the checks themselves on 2 cores.  Workers assert the
invariants that need the live engine and return plain data for the test to assert on.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Dict, List, Optional

import torch

IN, HID, OUT = 13, 17, 5
MICRO_BATCH = 4


def make_model(seed: int = 0) -> torch.nn.Module:
    """Tiny MLP whose tensors (221, 17, 85, 5 elements) do not line up with ZeRO's
    partition boundaries: the first weight is split across the two ranks' partitions."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT))


def batch(step: int, rank: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO_BATCH, IN, generator=g)
    y = torch.randn(MICRO_BATCH, OUT, generator=g)
    return x.to(dtype), y.to(dtype)


def ds_config(stage: int, *, dtype: str = "fp32", offload: bool = False, opt_type: str = "MGUPAdamW",
              opt_params: Optional[Dict[str, Any]] = None, zero_extra: Optional[Dict[str, Any]] = None,
              **top) -> Dict[str, Any]:
    zero: Dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    zero.update(zero_extra or {})
    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": opt_type, "params": dict(opt_params if opt_params is not None else {"lr": 1e-2})},
        "zero_optimization": zero,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    cfg.update(top)
    return cfg


def _dtype_of(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def train_steps(engine, steps: range, rank: int, same_data: bool = False, fixed: bool = False) -> List[float]:
    """``same_data``: every rank sees the same batch (the averaged gradient is then the
    single-device gradient, bit for bit).  ``fixed``: the same batch at every step (so the
    loss must go down)."""
    losses = []
    dtype = _dtype_of(engine)
    for step in steps:
        x, y = batch(0 if fixed else step, 0 if same_data else rank, dtype)
        loss = torch.nn.functional.mse_loss(engine(x).float(), y.float())
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _np(x):
    """Tensors go back to the parent as numpy arrays: a torch tensor in the result queue is
    shared through a file descriptor that dies with the worker."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, dict):
        return {k: _np(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_np(v) for v in x)
    return x


def full_params(engine) -> List[torch.Tensor]:
    """Every parameter of the engine's module, whole, in fp32 (gathers under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def check_layouts(engine) -> List[Any]:
    """Assert that every layout segment names the elements it claims (the fp32 partition
    slice equals the whole parameter's slice) and return the layouts in plain form.
    Call right after ``initialize``, when the fp32 master is the bit16 params' value."""
    from mgup_dist.integrations.deepspeed import zero_layouts

    model_params = list(engine.module.parameters())
    by_model = full_params(engine)
    w = engine.optimizer
    groups = next((getattr(w, a) for a in ("bit16_groups", "bf16_groups", "fp16_groups") if hasattr(w, a)),
                  [g["params"] for g in w.param_groups])
    # tensor_id = running index over the optimizer's param groups (for MGUPMuon: the
    # matrices' group first), which is not the module's order in general
    in_tid_order = [p for g in groups for p in g]
    index = [next(i for i, q in enumerate(model_params) if q is p) for p in in_tid_order]
    whole = [by_model[i] for i in index]
    model_dtype = _dtype_of(engine)
    out = []
    for group_index, flat, layout in zero_layouts(engine.optimizer):
        assert flat.numel() == layout.numel
        for s in layout.segments:
            # the fp32 master may keep the unrounded init (ZeRO-0 bf16): compare in the model dtype
            got = flat.detach().reshape(-1)[s.local_start:s.local_start + s.length].to(model_dtype).float()
            want = whole[s.tensor_id].reshape(-1)[s.global_start:s.global_start + s.length]
            assert s.global_numel == whole[s.tensor_id].numel()
            assert tuple(s.global_shape) == tuple(whole[s.tensor_id].shape)
            assert torch.equal(got, want), f"segment {s} does not hold what it claims"
        out.append((group_index, layout.numel, [(s.tensor_id, s.global_start, s.length) for s in layout.segments],
                    list(layout.collective)))
    return out


def _init(model, cfg, optimizer=None):
    import deepspeed

    import mgup_dist.deepspeed  # noqa: F401  registers the MGUP names

    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, optimizer=optimizer,
                                           model_parameters=None if optimizer is not None else model.parameters())
    return engine


# --------------------------------------------------------------------------------------
# 1. Training matrix: ZeRO 0/1/2/3, fp32 / bf16, CPU offload, from a JSON config
# --------------------------------------------------------------------------------------
def worker_train_matrix(rank, world, cases):
    """``cases``: list of ``(name, ds_config dict)``.  Returns per case: wrapper class,
    inner optimizer class, rank-mean losses on a fixed batch, layouts, state keys, steps."""
    from mgup_dist.integrations.deepspeed import find_mgup_optimizer

    out = {}
    for name, cfg in cases:
        engine = _init(make_model(), cfg)
        layouts = check_layouts(engine)
        opt = find_mgup_optimizer(engine)
        losses = train_steps(engine, range(4), rank, fixed=True)
        # the mean loss over ranks (each rank has its own fixed batch)
        t = torch.tensor(losses, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        losses = (t / world).tolist()
        states = []
        if opt is not None:
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state.get(p, {})
                    states.append(sorted(st))
            if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: params swapped in per step
                for p in engine.optimizer.fp32_partitioned_groups_flat:
                    states.append(sorted(opt.state.get(p, {})))
        out[name] = dict(wrapper=type(engine.optimizer).__name__, inner=type(opt).__name__ if opt else None,
                         losses=losses, layouts=layouts, states=states,
                         step=[float(st["step"]) for st in opt.state.values() if "step" in st] if opt else [])
        if hasattr(engine, "destroy"):
            engine.destroy()
    return out


# --------------------------------------------------------------------------------------
# 2. Exactness: ZeRO-2 / ZeRO-3 step == single-device MGUP step on identical gradients
# --------------------------------------------------------------------------------------
def worker_exact(rank, world, cases, steps=3):
    """``cases``: ``(name, ds_config, ref_kwargs)``.  Both ranks see the same batch, so the
    averaged gradient equals the single-device gradient bit for bit; the reference is the
    same MGUP class on an unsharded copy of the model in this process.  Returns the max abs
    difference of every parameter after ``steps`` steps."""
    import mgup_dist

    out = {}
    for name, cfg, ref_kwargs in cases:
        ref_model = make_model()
        ref_opt = mgup_dist.OPTIMIZERS[cfg["optimizer"]["type"]](ref_model.parameters(), **ref_kwargs)
        for step in range(steps):
            x, y = batch(step, 0)
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref_model(x), y).backward()
            ref_opt.step()
        engine = _init(make_model(), cfg)
        train_steps(engine, range(steps), rank, same_data=True)
        got = full_params(engine)
        diffs = [float((a - b.detach()).abs().max()) for a, b in zip(got, ref_model.parameters())]
        out[name] = diffs
    return out


def state_pieces(engine, keys=("exp_avg", "exp_avg_sq")):
    """This rank's pieces of the MGUP state, per original tensor: ``{(tensor_id, key):
    {global_start: piece}}`` plus ``"step"``: the step count of every partition.  Merge the
    ranks' dicts with :func:`merge_pieces`."""
    from mgup_dist.integrations.deepspeed import find_mgup_optimizer, zero_layouts

    opt = find_mgup_optimizer(engine)
    out: Dict[Any, Any] = {"step": []}
    for _, flat, layout in zero_layouts(engine.optimizer):
        st = opt.state[flat]
        for s in layout.segments:
            for key in keys:
                out.setdefault((s.tensor_id, key), {})[s.global_start] = \
                    st[key].detach().float().reshape(-1)[s.local_start:s.local_start + s.length].clone()
        out["step"].append(float(st["step"]))
    return out


def merge_pieces(per_rank: List[Dict[Any, Any]]) -> Dict[Any, Any]:
    """Whole flat state tensors from the ranks' :func:`state_pieces`."""
    merged: Dict[Any, Any] = {"step": []}
    pieces: Dict[Any, Dict[int, torch.Tensor]] = {}
    for d in per_rank:
        merged["step"] += d["step"]
        for k, v in d.items():
            if k != "step":
                pieces.setdefault(k, {}).update(v)
    for k, v in pieces.items():
        merged[k] = torch.cat([torch.as_tensor(v[start]) for start in sorted(v)])
    return merged


# --------------------------------------------------------------------------------------
# 3. Checkpoints
# --------------------------------------------------------------------------------------
def worker_save_resume(rank, world, ckpt_dir, cfg, n_before=3, n_after=3):
    """Uninterrupted run vs save at step ``n_before`` + load into a fresh engine + continue.
    Returns both loss sequences, the params at the save point, and the full optimizer state
    (gathered, per tensor) at the save point."""
    engine = _init(make_model(), cfg)
    train_steps(engine, range(n_before), rank, same_data=True)
    engine.save_checkpoint(ckpt_dir, tag="mid")
    params_at_save = full_params(engine)
    state_at_save = state_pieces(engine)
    cont = train_steps(engine, range(n_before, n_before + n_after), rank, same_data=True)
    final = full_params(engine)

    fresh = _init(make_model(seed=123), cfg)  # a different init: everything must come from the checkpoint
    fresh.load_checkpoint(ckpt_dir, tag="mid")
    resumed = train_steps(fresh, range(n_before, n_before + n_after), rank, same_data=True)
    final_resumed = full_params(fresh)
    return _np(dict(cont=cont, resumed=resumed, params_at_save=params_at_save, state_at_save=state_at_save,
                    final_diff=max(float((a - b).abs().max()) for a, b in zip(final, final_resumed))))


def worker_universal_load(rank, world, ckpt_dir, tag, cfg, n_before=3, n_after=3):
    """Load a universal checkpoint at this world size; return the loaded MGUP state (per
    tensor, whole) and the losses of the continued run."""
    cfg = dict(cfg, checkpoint={"load_universal": True})
    engine = _init(make_model(seed=123), cfg)
    engine.load_checkpoint(ckpt_dir, tag=tag)
    state = state_pieces(engine)
    params = full_params(engine)
    losses = train_steps(engine, range(n_before, n_before + n_after), rank, same_data=True)
    return _np(dict(state=state, params=params, losses=losses))


# --------------------------------------------------------------------------------------
# 4. Bad configs, client optimizers
# --------------------------------------------------------------------------------------
def _error_of(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test asserts type and message
        return type(exc).__name__, str(exc)
    return None


def worker_bad_configs(rank, world):
    """Errors for bad configs and the client-optimizer warning, through deepspeed.initialize."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    import mgup_dist
    from mgup_dist.integrations.deepspeed import find_mgup_optimizer, register

    out = {}
    out["unknown_param"] = _error_of(lambda: _init(make_model(), ds_config(2, opt_params={"lr": 1e-3, "foo": 1})))
    out["adam_only_param"] = _error_of(
        lambda: _init(make_model(), ds_config(2, opt_params={"lr": 1e-3, "torch_adam": True})))
    out["invalid_mask_ratio"] = _error_of(
        lambda: _init(make_model(), ds_config(2, opt_params={"lr": 1e-3, "mask_ratio": 1.5})))
    out["invalid_lr"] = _error_of(lambda: _init(make_model(), ds_config(1, opt_params={"lr": -1.0})))
    out["invalid_scope"] = _error_of(
        lambda: _init(make_model(), ds_config(3, opt_params={"lr": 1e-3, "scope": "everything"})))
    out["unknown_type"] = _error_of(lambda: _init(make_model(), ds_config(2, opt_type="MGUPAdamV")))
    out["max_grad_norm"] = _error_of(
        lambda: _init(make_model(), ds_config(2, opt_params={"lr": 1e-3, "max_grad_norm": 1.0})))

    # case-insensitive names, betas as a JSON list
    eng = _init(make_model(), ds_config(2, opt_type="mgupadamw", opt_params={"lr": 1e-3, "betas": [0.8, 0.9]}))
    opt = find_mgup_optimizer(eng)
    out["lowercase"] = (type(opt).__name__, tuple(opt.param_groups[0]["betas"]))

    # registration is idempotent
    register()
    register()
    out["zero_supported_once"] = [ZERO_SUPPORTED_OPTIMIZERS.count(c) for c in mgup_dist.OPTIMIZERS.values()]

    # a client optimizer while the config names MGUP: DeepSpeed uses the client; we warn
    model = make_model()
    client = mgup_dist.MGUPLion(model.parameters(), lr=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eng = _init(model, ds_config(2), optimizer=client)
    out["client_warning"] = [str(w.message) for w in caught if "client optimizer" in str(w.message)]
    out["client_used"] = find_mgup_optimizer(eng) is client
    out["client_layouts"] = len(client._layouts)
    out["client_steps"] = train_steps(eng, range(2), rank)

    # a client MGUP optimizer under ZeRO-Offload: accepted without zero_force_ds_cpu_optimizer=false
    model = make_model()
    client = mgup_dist.MGUPAdamW(model.parameters(), lr=1e-3)
    cfg = ds_config(2, offload=True)
    del cfg["optimizer"]
    eng = _init(model, cfg, optimizer=client)
    out["client_offload"] = (find_mgup_optimizer(eng) is client, train_steps(eng, range(2), rank))
    return out


def worker_unregistered(rank, world, stages):
    """A client MGUP optimizer handed to ``deepspeed.initialize`` without the registration
    (no ``import mgup_dist.deepspeed``; ``zero_allow_untested_optimizer`` lets ZeRO take it,
    as the HF Trainer sets it): each ZeRO stage must refuse by name, never step the flat
    partitions with a per-buffer top-K.  Returns {stage: (error type, message) or losses}."""
    import deepspeed

    import mgup_dist

    assert "mgup_dist.deepspeed" not in sys.modules
    out = {}
    for stage in stages:
        model = make_model()
        client = mgup_dist.MGUPAdamW(model.parameters(), lr=1e-2)
        cfg = ds_config(stage, zero_allow_untested_optimizer=True)
        del cfg["optimizer"]

        def run():
            engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, optimizer=client)
            return train_steps(engine, range(2), rank)

        out[stage] = _error_of(run) or "stepped"
    return out


# --------------------------------------------------------------------------------------
# 3. ZeRO-Offload: the CPU step of the C++ kernels on the flat fp32 partitions
# --------------------------------------------------------------------------------------
def worker_offload_fast_path(rank, world, cases, steps=3):
    """As ``worker_exact``, and per case the CPU kernel calls (``cpu_ext.calls``) that the
    engine's steps made on this rank, and the fp32 partitions' dtype and device."""
    import mgup_dist
    from mgup_dist.integrations.deepspeed import find_mgup_optimizer
    from mgup_dist.kernels import cpu_ext

    out = {"ext": cpu_ext.available()}
    for name, cfg, ref_kwargs in cases:
        ref_model = make_model()
        ref_opt = mgup_dist.OPTIMIZERS[cfg["optimizer"]["type"]](ref_model.parameters(), **ref_kwargs)
        for step in range(steps):
            x, y = batch(step, 0)
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref_model(x), y).backward()
            ref_opt.step()
        engine = _init(make_model(), cfg)
        opt = find_mgup_optimizer(engine)
        cpu_ext.calls.clear()
        train_steps(engine, range(steps), rank, same_data=True)
        calls = dict(cpu_ext.calls)
        got = full_params(engine)
        # the moments live beside the fp32 partitions they step (ZeRO-3 swaps its sub-groups in
        # and out of the param groups around each step: read the state)
        moments = [v for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg") and torch.is_tensor(v)]
        out[name] = {
            "diffs": [float((a - b.detach()).abs().max()) for a, b in zip(got, ref_model.parameters())],
            "calls": calls,
            "partitions": sorted({(str(v.dtype), v.device.type) for v in moments}),
        }
    return out
