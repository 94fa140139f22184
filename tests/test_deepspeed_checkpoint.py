"""DeepSpeed checkpoints of an MGUP run (real DeepSpeed, CPU, gloo).

* ``save_checkpoint`` at step 3, ``load_checkpoint`` into a fresh engine built from a
  different init, continue 3 steps: losses and parameters identical, bit for bit, to the
  uninterrupted run (ZeRO-2 and ZeRO-3).
* ``ds_to_universal`` (DeepSpeed's converter, run as its CLI) + universal load at another
  world size (2 -> 1 process): the MGUP state (``exp_avg``, ``exp_avg_sq``, ``step``: torch's
  names, which the converter carries) comes back exactly, and, because both ranks trained on
  the same batches, the 1-process continuation reproduces the 2-process losses exactly.
* ``zero_to_fp32`` rebuilds the fp32 weights at the save point exactly.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

import _ds_workers as W  # noqa: E402
import torch  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

P = {"lr": 1e-2, "weight_decay": 0.01}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_save_resume_universal_and_zero_to_fp32(tmp_path, stage):
    ckpt = str(tmp_path / "ckpt")
    cfg = W.ds_config(stage, opt_params=P, gradient_clipping=0.0)
    results = run_distributed(W.worker_save_resume, 2, ckpt, cfg, timeout=300)

    # 1. resume in a fresh engine: bit-exact
    for r in results:
        assert r["resumed"] == r["cont"], f"ZeRO-{stage}: resumed {r['resumed']} != uninterrupted {r['cont']}"
        assert r["final_diff"] == 0.0
    saved = W.merge_pieces([r["state_at_save"] for r in results])
    assert saved["step"] and all(s == 3.0 for s in saved["step"])

    # 2. universal checkpoint, loaded by one process
    conv = subprocess.run(
        [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", f"{ckpt}/mid",
         "--output_folder", f"{ckpt}/mid_universal", "--num_extract_workers", "1", "--num_merge_workers", "1",
         "--inject_missing_state"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ),
    )
    assert conv.returncode == 0, conv.stderr[-4000:]
    # (the ZeRO-3 converter keeps `step` in the optimizer's global state, not per parameter)
    for name in ("exp_avg.pt", "exp_avg_sq.pt", "fp32.pt") + (("step.pt",) if stage < 3 else ()):
        assert (tmp_path / "ckpt" / "mid_universal" / "zero" / "0.weight" / name).exists(), name

    (u,) = run_distributed(W.worker_universal_load, 1, ckpt, "mid_universal", cfg, timeout=240)
    loaded = W.merge_pieces([u["state"]])
    assert loaded["step"] and all(s == 3.0 for s in loaded["step"]), loaded["step"]
    keys = [k for k in saved if k != "step"]
    assert sorted(keys) == sorted(k for k in loaded if k != "step")
    assert {k[1] for k in keys} == {"exp_avg", "exp_avg_sq"}
    for k in keys:
        assert torch.equal(saved[k], loaded[k]), f"ZeRO-{stage}: universal state {k} differs"
    for a, b in zip(results[0]["params_at_save"], u["params"]):
        assert (a == b).all()
    assert u["losses"] == results[0]["cont"], "2 -> 1 continuation differs from the uninterrupted run"

    # 3. zero_to_fp32
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="mid")
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for (name, t), want in zip(sd.items(), results[0]["params_at_save"]):
        assert torch.equal(t.float(), torch.as_tensor(want)), name
