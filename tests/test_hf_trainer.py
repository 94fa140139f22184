"""MGUP under Hugging Face ``transformers.Trainer`` (+ Accelerate + DeepSpeed).

1. Each shipped ``configs/deepspeed/hf_zero*.json`` drives a real ``Trainer`` on 2 CPU
   ranks launched as ``torchrun -m mgup_dist.run train.py --deepspeed CFG``: the user
   script imports nothing from mgup_dist, HF fills the ``"auto"`` values, and the optimizer
   DeepSpeed builds is MGUP-AdamW with the config's MGUP settings and the Trainer's lr.
   A run is judged by what every rank wrote at the end of its script (and equal losses),
   not by the exit status alone: DeepSpeed's ZeRO-3 teardown on CPU sometimes aborts a rank
   at interpreter exit after it finished (``judge_run`` accepts that and nothing else).
2. ``Trainer(optimizer_cls_and_kwargs=(MGUPAdamW, {...}))`` in one process, no DeepSpeed.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from dist_utils import free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "llama_tiny.json"
HF_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("hf_*.json"))

# A plain HF script: model, dataset, TrainingArguments(deepspeed=...), Trainer.train().
USER_SCRIPT = textwrap.dedent('''
    import argparse, json, os
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    p = argparse.ArgumentParser()
    p.add_argument("--deepspeed", required=True)
    p.add_argument("--model-config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.load(open(a.model_config))))

    class Bytes(torch.utils.data.Dataset):   # a repeating byte pattern: learnable in a few steps
        def __len__(self):
            return 64
        def __getitem__(self, i):
            ids = (torch.arange(32) * 7 + i) % 50
            return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=6, learning_rate=3e-3, weight_decay=0.05, adam_beta2=0.95,
                             max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                             deepspeed=a.deepspeed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Bytes())
    trainer.train()
    engine = trainer.model_wrapped
    inner = engine.optimizer.optimizer
    group = inner.param_groups[0]
    rank = torch.distributed.get_rank()
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(engine=type(engine).__name__, wrapper=type(engine.optimizer).__name__,
                       inner=type(inner).__name__, module=type(inner).__module__,
                       mask_ratio=group["mask_ratio"], alpha=group["alpha"], gamma=group["gamma"],
                       betas=list(group["betas"]), weight_decay=group["weight_decay"],
                       micro=engine.train_micro_batch_size_per_gpu(), hf_world=args.world_size,
                       accum=engine.gradient_accumulation_steps(),
                       losses=[h["loss"] for h in trainer.state.log_history if "loss" in h]), f)
''')


# What a rank's C++ runtime prints when a thread is still joinable as the interpreter exits:
# DeepSpeed's ZeRO-3 teardown on CPU does this now and then (its own AdamW too), after the
# training script has returned.  torchrun then reports the rank's SIGABRT with a traceback
# of its own (ChildFailedError).
TEARDOWN_ABORT = "terminate called without an active exception"


def judge_run(returncode: int, output: str, out_dir: pathlib.Path, nranks: int) -> list:
    """The results every rank wrote at the end of its script, or AssertionError.

    A run passes when every rank wrote its results and the only failure, if any, is the
    teardown abort after that: every Python traceback in the output is torchrun's report
    of a child killed by SIGABRT, and the abort message is there.  A Python error in a rank
    (a traceback of its own), a missing or unreadable result, or any other exit fails."""
    tail = output[-8000:]
    results = []
    for r in range(nranks):
        path = out_dir / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results (exit status {returncode})\n{tail}"
        try:
            results.append(json.loads(path.read_text()))
        except ValueError as e:
            raise AssertionError(f"rank {r} wrote unreadable results: {e}\n{tail}") from e
    if returncode != 0:
        chunks = output.split("Traceback (most recent call last)")[1:]
        foreign = [c for c in chunks if "ChildFailedError" not in c]
        assert not foreign, f"a rank raised (exit status {returncode}):\n{foreign[0][-4000:]}"
        assert TEARDOWN_ABORT in output and "SIGABRT" in output, (
            f"exit status {returncode}, not the teardown abort after the results were written\n{tail}")
        # ranks that died: of the abort (SIGABRT, -6), or stopped by torchrun after it (SIGTERM, -15)
        codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)}
        assert codes <= {-6, -15}, f"a rank exited with {sorted(codes)}, not only the teardown abort\n{tail}"
    return results


def _torchrun_abort_report(rank: int = 1) -> str:
    """The shape of torchrun's report of a child that died of SIGABRT."""
    return (
        "Traceback (most recent call last):\n  File \"/usr/lib/python3/site-packages/torch/distributed/run.py\", "
        "line 900, in <module>\n    main()\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "====\ntrain.py FAILED\nRoot Cause (first observed failure):\n[0]:\n"
        f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : -6 (pid: 4242)\n"
        "  traceback : Signal 6 (SIGABRT) received by PID 4242\n====\n"
    )


def _write_results(out_dir, ranks):
    for r in ranks:
        (out_dir / f"rank{r}.json").write_text(json.dumps({"losses": [1.0, 0.5]}))


def test_judge_accepts_the_teardown_abort_after_all_results(tmp_path):
    _write_results(tmp_path, [0, 1])
    assert len(judge_run(0, "", tmp_path, 2)) == 2
    out = "{'train_loss': 0.5}\n" + TEARDOWN_ABORT + "\n" + _torchrun_abort_report()
    assert [r["losses"] for r in judge_run(1, out, tmp_path, 2)] == [[1.0, 0.5]] * 2


def test_judge_fails_a_rank_error_or_missing_results(tmp_path):
    _write_results(tmp_path, [0])
    with pytest.raises(AssertionError, match="rank 1 wrote no results"):
        judge_run(1, TEARDOWN_ABORT + _torchrun_abort_report(), tmp_path, 2)
    _write_results(tmp_path, [1])
    rank_error = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"train.py\", line 40\n"
                  "[rank1]: RuntimeError: shape mismatch\n")
    with pytest.raises(AssertionError, match="a rank raised"):
        judge_run(1, rank_error + TEARDOWN_ABORT + _torchrun_abort_report(), tmp_path, 2)
    with pytest.raises(AssertionError, match="not the teardown abort"):
        judge_run(1, "Killed\n", tmp_path, 2)
    with pytest.raises(AssertionError, match="not the teardown abort"):  # SIGABRT without the exit-time message
        judge_run(1, _torchrun_abort_report(), tmp_path, 2)
    segv = _torchrun_abort_report().replace("-6 (pid", "-11 (pid").replace("Signal 6 (SIGABRT)", "Signal 11 (SIGSEGV)")
    with pytest.raises(AssertionError, match=r"exited with \[-11, -6\]"):
        judge_run(1, TEARDOWN_ABORT + _torchrun_abort_report(0) + segv, tmp_path, 2)
    (tmp_path / "rank0.json").write_text('{"losses": [1.0')
    with pytest.raises(AssertionError, match="rank 0 wrote unreadable results"):
        judge_run(0, "", tmp_path, 2)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("config", HF_CONFIGS)
def test_hf_trainer_with_shipped_config_through_the_runner(tmp_path, config):
    assert "mgup" not in USER_SCRIPT.lower()  # an unmodified HF script
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "mgup_dist.run", str(script), "--deepspeed", str(ROOT / "configs" / "deepspeed" / config),
           "--model-config", str(TINY), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=380, env=env, cwd=str(tmp_path))
    results = judge_run(proc.returncode, proc.stdout + proc.stderr, out, 2)
    shipped = json.loads((ROOT / "configs" / "deepspeed" / config).read_text())["optimizer"]["params"]
    for res in results:
        assert res["inner"] == "MGUPAdamW" and res["module"].startswith("mgup_dist"), res
        assert res["wrapper"].startswith("DeepSpeedZeroOptimizer"), res
        # MGUP keys from the file; the "auto" ones from TrainingArguments
        assert (res["mask_ratio"], res["alpha"], res["gamma"]) == (
            shipped["mask_ratio"], shipped["alpha"], shipped["gamma"])
        assert res["betas"] == [0.9, 0.95] and res["weight_decay"] == 0.05
        assert (res["micro"], res["accum"]) == (2, 2)
        losses = res["losses"]
        assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0] - 0.1, losses
    # On CPU ranks accelerate's DeepSpeed state counts 1 process (TrainingArguments.world_size == 1), so
    # both ranks read the same batches; DeepSpeed still reduces the gradients and shards the optimizer
    # over the 2 ranks, so the replicas stay identical.
    assert results[0]["losses"] == results[1]["losses"]


def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from mgup_dist import MGUPAdamW

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**json.loads(TINY.read_text())))
    data = [{"input_ids": (torch.arange(32) * 7 + i) % 50} for i in range(32)]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(MGUPAdamW, {"lr": 3e-3, "betas": (0.9, 0.95), "mask_ratio": 0.25,
                                                            "alpha": 1.5, "gamma": 0.75}))
    trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, MGUPAdamW)
    assert {g["mask_ratio"] for g in inner.param_groups} == {0.25}
    assert {(g["alpha"], g["gamma"]) for g in inner.param_groups} == {(1.5, 0.75)}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
