"""Smoke test of the benchmark command: tiny LLaMA shapes, 2 steps, every row and column."""
from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch

from mgup_dist import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_llama_shapes_count_parameters():
    # LLaMA-130M (untied embeddings): 134.1M parameters, 12 * 9 + 3 tensors
    shapes = bench.llama_shapes(bench.MODELS["llama130m"])
    assert len(shapes) == 12 * 9 + 3
    assert sum(math.prod(s) for _, s in shapes) == 134_105_856
    assert dict(shapes)["layers.0.mlp.down_proj.weight"] == (768, 2048)
    assert dict(shapes)["lm_head.weight"] == (32000, 768)


@pytest.mark.timeout(300)
def test_bench_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        _check_table(capsys)
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide: restore for later tests


def _check_table(capsys):
    rows = bench.main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--naive-steps", "1",
                       "--muon-steps", "1", "--mask-ratio", "0.25", "0.5", "--threads", "1",
                       "--compile", "off", "--quiet", "--clock", "cpu"])
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("|")]
    assert lines[0] == "| " + " | ".join(bench.HEADER) + " |"
    names = [(r.name, r.mask_ratio) for r in rows]
    assert names == [
        ("AdamW(fused)", None), ("AdamW(foreach)", None),
        ("naive topk+scatter", 0.25), ("naive topk+scatter", 0.5),
        ("MGUPAdamW", 0.25), ("MGUPAdamW", 0.5), ("CMGUPAdamW", None),
        ("MGUPLion", 0.25), ("MGUPLion", 0.5), ("Muon+AdamW(torch)", None), ("MGUPMuon", 0.25), ("MGUPMuon", 0.5),
    ]
    assert len(lines) == 2 + len(rows)
    for r in rows:
        assert len(r.times_ms) == (1 if r.name.startswith("naive") or "Muon" in r.name else 2)
        assert r.median_ms > 0 and math.isfinite(r.vs_fused) and math.isfinite(r.naive_speedup)
        assert math.isfinite(r.vs_muon) == ("Muon" in r.name), r  # the Muon rows against torch.optim.Muon
    fused = rows[0]
    assert fused.vs_fused == 1.0 and rows[1].vs_foreach == 1.0
    assert torch.get_num_threads() == 1


def test_naive_baseline_is_mgup_adamw():
    """The baseline must compute the same thing as the real optimizer (else the speed-up is
    meaningless): with eps = 0 its eps placement equals ours, and random scores have no ties."""
    import mgup_dist

    gen = torch.Generator().manual_seed(0)
    p = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    q = p.clone()
    a = bench.NaiveTopkMGUPAdamW([p], lr=1e-2, eps=0.0, mask_ratio=0.5)
    b = mgup_dist.MGUPAdamW([q], lr=1e-2, eps=0.0, mask_ratio=0.5)
    for _ in range(3):
        g = torch.randn(12, 7, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert (p - q).abs().max().item() < 1e-12


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        bench.run_bench("tiny", mask_ratios=(1.5,))
    with pytest.raises(ValueError, match="optimizers"):
        bench.run_bench("tiny", steps=1, warmup=0, naive_steps=1, optimizers=("SGD",))
    with pytest.raises(ValueError, match="clock"):
        bench.run_bench("tiny", steps=1, warmup=0, naive_steps=1, clock="gpu")
    with pytest.raises(SystemExit):
        bench.main(["--model", "gpt5"])


@pytest.mark.timeout(300)
def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "mgup_dist.bench", "--model", "tiny", "--steps", "1",
                          "--warmup", "1", "--naive-steps", "1", "--optimizers", "CMGUPAdamW", "--quiet"],
                         capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "| CMGUPAdamW | - |" in out.stdout and "| CMGUPAdamW+compile | - |" in out.stdout
