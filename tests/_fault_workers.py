"""Worker functions (module level, spawned by dist_utils.run_distributed) of test_faults.py."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def agreement(rank, world, engine, setting, steps=3, scheduler=False, opt_name="MGUPAdamW", mode="step"):
    """Rank 1 takes a different ``setting`` (or, with ``scheduler``, a scheduler that
    changes lr differently from step 2 on); returns the ValueError text or None."""
    from mgup_dist import OPTIMIZERS

    model = _model()
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped, params = DDP(model), model.parameters()
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        wrapped, params = model, model.parameters()
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
    if opt_name == "MGUPLion":
        kw.pop("eps")
    if rank == 1 and setting is not None:
        kw[setting[0]] = setting[1]
    opt = OPTIMIZERS[opt_name](params, **kw)
    opt.check_agreement = mode
    if engine == "ddp":
        opt.replicated()
    sched = None
    if scheduler:
        factor = 0.5 if rank == 1 else 1.0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 2 else factor)
    torch.manual_seed(1 + rank)
    try:
        for _ in range(steps):
            x = torch.randn(4, 8)
            wrapped(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()
    except ValueError as e:
        return str(e)
    return None


def agreement_overhead(rank, world, steps=200, mode="step"):
    """Mean seconds of MGUPAdamW.step() on a DDP-replicated tiny model, check_agreement=mode."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mgup_dist import OPTIMIZERS

    model = _model()
    ddp = DDP(model)
    opt = OPTIMIZERS["MGUPAdamW"](model.parameters(), lr=1e-3).replicated()
    opt.check_agreement = mode
    x = torch.randn(4, 8)
    ddp(x).square().mean().backward()
    times = []
    for i in range(steps + 10):
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    times = sorted(times[10:])
    return times[len(times) // 2]


def agreement_cases(rank, world, cases):
    """:func:`agreement` for each (engine, setting, scheduler) case; then the recipe's DDP
    engine declares its MGUP optimizer replicated."""
    out = [agreement(rank, world, engine, setting, scheduler=sched, mode=mode) for engine, setting, sched, mode in cases]
    from mgup_dist.train import config as tcfg
    from mgup_dist.train.engines import DDPEngine

    cfg = tcfg.parse(["--device", "cpu", "--out-dir", "/tmp/unused-agreement"], world_size=world)
    cfg.bf16 = False
    eng = DDPEngine(cfg, _model(), torch.device("cpu"), None)
    out.append(None if getattr(eng.optimizer, "_replica_group", False) is not False else "not replicated")
    return out


def agreement_zero2(rank, world):
    """DeepSpeed ZeRO-2 with MGUPAdamW where rank 1's config says another lr: the
    ValueError text of the first step, or None."""
    import deepspeed

    import mgup_dist.deepspeed  # noqa: F401  registers the MGUP names

    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "MGUPAdamW", "params": {"lr": 1e-2 if rank == 0 else 2e-2}},
           "zero_optimization": {"stage": 2}}
    model = _model()
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    torch.manual_seed(1 + rank)
    try:
        for _ in range(2):
            loss = engine(torch.randn(2, 8)).square().mean()
            engine.backward(loss)
            engine.step()
    except ValueError as e:
        return str(e)
    return None


def structural_disagreements(rank, world, cases):
    """Ranks whose optimizers differ in what they hold (another rule, an extra param group,
    another backend, compile on one rank only), a 0-d tensor lr that differs, a mask_ratio
    changed on one rank mid-run: each case returns the ValueError text of this rank (None: no
    error) and the step it was raised at.  A gloo size mismatch would abort the process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mgup_dist import MGUPAdamW, MGUPLion

    out = []
    for case in cases:
        model = _model()
        if case in ("backend", "mid_run_mask_ratio"):
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            wrapped = model
        else:
            wrapped = DDP(model)
        params = list(model.parameters())
        kw = {"lr": 1e-2}
        if case == "rule" and rank == 1:
            opt = MGUPLion(params, **kw)
        elif case == "extra_group" and rank == 1:
            opt = MGUPAdamW([{"params": params[:2]}, {"params": params[2:]}], **kw)
        elif case == "backend":
            opt = MGUPAdamW(params, backend="torch" if rank == 1 else "cpu", **kw)
        elif case == "tensor_lr":
            opt = MGUPAdamW(params, lr=torch.tensor(1e-3 if rank == 0 else 2e-3))
        else:
            opt = MGUPAdamW(params, **kw)
        if case != "backend" and case != "mid_run_mask_ratio":
            opt.replicated()
        torch.manual_seed(1 + rank)
        got = (None, None)
        try:
            for step in range(4):
                if case == "mid_run_mask_ratio" and step == 2 and rank == 1:
                    opt.param_groups[0]["mask_ratio"] = 0.25
                wrapped(torch.randn(4, 8)).square().mean().backward()
                opt.step()
                opt.zero_grad()
        except ValueError as e:
            got = (str(e), step)
        out.append(got)
        dist.barrier()
    return out
