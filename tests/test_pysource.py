"""``--dataset pysource`` (mgup_dist/train/pysource.py) on small directories made here, and
the plots / table of ``mgup-dist plot`` on synthetic metrics."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from mgup_dist.train import config as tcfg
from mgup_dist.train import run
from mgup_dist.train.plot import load_run, plot_runs, summary_table
from mgup_dist.train.pysource import build_corpus, is_validation, list_files, parse_roots


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_pkg(root, name, n, order=1):
    """``n`` distinct modules of package ``name``; ``order=-1`` creates them in reverse."""
    for i in list(range(n))[::order]:
        _write(root, f"{name}/mod_{i:03d}.py", f"# {name} module {i}\ndef f_{i}(x):\n    return x * {i} + {len(name)}\n")


def _contents(corpus, split):
    """The files of one split as byte strings (the stream is file bytes, EOS=257 after each)."""
    ids = corpus[split].tolist()
    out, cur = [], []
    for t in ids:
        if t == 257:
            out.append(bytes(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream ends with EOS"
    return out


def test_dedup_nonpython_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_pkg(a, "pkg", 30)
    make_pkg(b, "pkg", 30, order=-1)          # same files, created in the other order
    for r in (a, b):
        _write(r, "vendored/copy.py", "# pkg module 3\ndef f_3(x):\n    return x * 3 + 3\n")   # = pkg/mod_003.py
        _write(r, "notes.txt", "not python")
        _write(r, "pkg/__pycache__/mod_000.cpython-311.py", "cache, skipped")
    ca = build_corpus([str(a)], val_fraction=0.3)
    cb = build_corpus([str(b)], val_fraction=0.3)
    assert ca["stats"]["files_seen"] == 31 and ca["stats"]["duplicates_dropped"] == 1
    assert ca["stats"]["train_files"] + ca["stats"]["val_files"] == 30
    for split in ("train", "val"):
        assert ca[split].dtype == torch.int16 and torch.equal(ca[split], cb[split])
    everything = _contents(ca, "train") + _contents(ca, "val")
    assert len(everything) == len(set(everything)) == 30
    assert all(b"not python" not in c and b"cache" not in c for c in everything)
    # Both splits get files, and each file is in the split its key hashes to.
    assert ca["stats"]["val_files"] > 0 and ca["stats"]["train_files"] > 0
    assert all(split == ("val" if is_validation(key, 0.3) else "train") for _, key, split in ca["files"])


def test_split_stable_when_a_package_is_added_or_the_root_moves(tmp_path):
    base = tmp_path / "site"
    make_pkg(base, "alpha", 40)
    before = build_corpus([str(base)], val_fraction=0.3)
    # Another package installed later, in the same root and as a second root.
    make_pkg(base, "zeta", 40)
    make_pkg(tmp_path / "other", "beta", 40)
    after = build_corpus([str(base), str(tmp_path / "other")], val_fraction=0.3)
    split_before = {key: split for _, key, split in before["files"]}
    split_after = {key: split for ri, key, split in after["files"] if key.startswith("alpha/")}
    assert split_before == split_after and len(split_after) == 40
    assert {k.split("/")[0] for _, k, _ in after["files"]} == {"alpha", "zeta", "beta"}
    # The same files under another absolute path: the same corpus, token for token.
    moved = tmp_path / "elsewhere" / "lib"
    shutil.copytree(base, moved)
    c1, c2 = build_corpus([str(base)], val_fraction=0.3), build_corpus([str(moved)], val_fraction=0.3)
    assert torch.equal(c1["train"], c2["train"]) and torch.equal(c1["val"], c2["val"])


def test_nested_root_read_once_and_byte_cap(tmp_path):
    std = tmp_path / "lib"
    make_pkg(std, "json2", 20)
    site = std / "site-packages"
    make_pkg(site, "pkgx", 20)
    files = list_files([str(std), str(site)])
    keys = [k for k, _, _ in files]
    assert len(keys) == 40 and not any(k.startswith("site-packages/") for k in keys)
    assert len(list_files(parse_roots(f"{std},{site}"))) == 40
    full = build_corpus([str(std), str(site)], val_fraction=0.3)
    capped = build_corpus([str(std), str(site)], max_bytes=200, val_fraction=0.3)
    # Whole files, in order, stopping at the first file that reaches the cap: a prefix of the full stream.
    for split in ("train", "val"):
        n = capped[split].numel()
        assert 0 < n < full[split].numel() and torch.equal(capped[split], full[split][:n])
        assert n - capped["stats"][f"{split}_files"] >= 200


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="pysource_roots: .* is not a directory"):
        parse_roots(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"pysource_roots: no \*\.py files"):
        build_corpus([str(tmp_path / "empty")])
    make_pkg(tmp_path / "one", "p", 1)
    with pytest.raises(ValueError, match="split is empty"):
        build_corpus([str(tmp_path / "one")])
    with pytest.raises(ValueError, match="pysource_max_bytes"):
        build_corpus([str(tmp_path / "one")], max_bytes=0)
    with pytest.raises(ValueError, match="tokenizer"):
        tcfg.parse(["--dataset", "pysource", "--tokenizer", "t5-base", "--pysource-roots", str(tmp_path / "one")])
    with pytest.raises(ValueError, match="pysource_max_bytes"):
        tcfg.parse(["--dataset", "pysource", "--pysource-max-bytes", "-1", "--pysource-roots", str(tmp_path / "one")])
    with pytest.raises(ValueError, match="pysource_roots"):
        tcfg.parse(["--dataset", "pysource", "--pysource-roots", str(tmp_path / "missing")])


@pytest.mark.timeout(120)
def test_train_on_pysource_records_optimizer_time(tmp_path):
    src = tmp_path / "src"
    for name in ("aa", "bb", "cc", "dd"):
        make_pkg(src, name, 100)        # 400 files: the default 2 % validation split gets some
    out = tmp_path / "run"
    s = run(["--dataset", "pysource", "--pysource-roots", str(src), "--steps", "6", "--eval-every", "3",
             "--log-every", "3", "--global-batch", "4", "--seq-len", "32", "--eval-tokens", "256",
             "--out-dir", str(out), "--no-progress", "--no-plots", "--no-tensorboard", "--resume", "never"])
    assert s["steps"] == 6 and math.isfinite(s["final_val_loss"]) and s["optimizer_ms"] > 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 3, 6] and val[0]["train_s"] == 0.0
    assert all(r["optimizer_ms"] > 0 for r in train)
    assert train[0]["train_s"] < train[1]["train_s"] and val[-1]["train_s"] == train[-1]["train_s"]


def _synthetic_run(d, opt, scale):
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step in range(0, 101, 10):
            if step:
                f.write(json.dumps({"step": step, "loss": 5 * scale / (1 + step / 20), "lr": 1e-3,
                                    "tokens_per_s": 1000.0, "optimizer_ms": 2.0 * scale, "train_s": step * scale}) + "\n")
            if step % 20 == 0:
                f.write(json.dumps({"step": step, "val_loss": 5.5 * scale / (1 + step / 20), "train_s": step * scale}) + "\n")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"name": os.path.basename(d), "optimizer": opt}, f)


def test_plot_steps_and_wallclock_and_table(tmp_path):
    import matplotlib.image

    runs = [str(tmp_path / "r1"), str(tmp_path / "r2")]
    _synthetic_run(runs[0], "adamw", 1.0)
    _synthetic_run(runs[1], "mgup_adamw", 1.5)
    paths = plot_runs(runs, str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["lr.png", "train_loss.png", "val_loss.png", "val_loss_time.png"]
    for p in paths:
        img = matplotlib.image.imread(p)
        # Not a blank canvas: many distinct pixel values (axes, curves, legend text).
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.01
        assert len(torch.unique(torch.from_numpy(img[..., :3].copy()).reshape(-1, 3), dim=0)) > 20
    table = summary_table([load_run(r) for r in runs]).splitlines()
    assert len(table) == 4 and table[2].startswith("| adamw |") and table[3].startswith("| mgup_adamw |")
    # final val loss of run 2: 5.5 * 1.5 / 6 = 1.375, ppl e^1.375; optimizer ms: mean of 3.0
    assert "1.3750 (3.96)" in table[3] and table[3].rstrip(" |").endswith("3.0")
