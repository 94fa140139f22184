"""The C4 evaluation follows GaLore's definition: the validation split shuffled with
seed 42, samples until 10M *non-pad* tokens are counted, long documents truncated with
their EOS kept.  Checked on a small fixture of allenai/c4-shaped shards."""
from __future__ import annotations

import gzip
import json

import torch

from mgup_dist.train import config as tcfg
from mgup_dist.train.data import (
    VAL_SHUFFLE_SEED,
    ByteTokenizer,
    _doc_eval_rows,
    buffer_shuffle,
    build_datasets,
    truncate_keep_eos,
)


def _write(dir_, texts_val, n_train=8):
    dir_.mkdir(parents=True)
    for split, texts in (("train", [f"train doc {i} " * 3 for i in range(n_train)]), ("validation", texts_val)):
        with gzip.open(dir_ / f"c4-{split}.00000-of-00001.json.gz", "wt", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t, "url": "u", "timestamp": "t"}) + "\n")
    return dir_


class EosByteTokenizer(ByteTokenizer):
    """Byte tokens with EOS appended, like T5's tokenizer appends </s>."""

    def encode(self, text):
        return list(text.encode("utf-8")) + [self.eos_token_id]


def test_buffer_shuffle_is_a_seeded_permutation():
    xs = list(range(50))
    a = list(buffer_shuffle(iter(xs), buffer_size=8))
    assert sorted(a) == xs and a != xs
    assert a == list(buffer_shuffle(iter(xs), seed=VAL_SHUFFLE_SEED, buffer_size=8)) and VAL_SHUFFLE_SEED == 42
    assert a != list(buffer_shuffle(iter(xs), seed=7, buffer_size=8))
    assert list(buffer_shuffle(iter(xs), buffer_size=1)) == xs   # a buffer of one keeps the order


def test_truncation_keeps_eos():
    eos = 257
    assert truncate_keep_eos([1, 2, 3, 4, 5, eos], 4, eos) == [1, 2, 3, eos]
    assert truncate_keep_eos([1, 2, 3, eos], 4, eos) == [1, 2, 3, eos]
    assert truncate_keep_eos([1, 2, 3, 4, 5], 4, eos) == [1, 2, 3, 4]    # no EOS to keep


def test_eval_budget_counts_non_pad_tokens():
    tok = ByteTokenizer()
    texts = ["x" * n for n in (5, 40, 7, 12, 64, 3, 9, 30, 50, 11)]
    rows = _doc_eval_rows(iter(texts), tok, seq_len=32, max_tokens=60, pack=False)
    lens = [len(r) for r in rows]
    assert lens == [5, 32, 7, 12, 32]          # 5+32+7+12 = 56 < 60 <= 88: stop at the crossing
    # The old definition (padded positions) would have stopped after 60 // 32 = 1 sample.
    assert len(rows) > 60 // 32
    rows = _doc_eval_rows(iter(texts), tok, seq_len=32, max_tokens=1, pack=False, min_rows=3)
    assert len(rows) == 3


def test_c4_validation_is_galore_shuffled_and_counted(tmp_path):
    texts = [f"validation document number {i} " + "word " * (i % 13) for i in range(40)]
    d = _write(tmp_path / "c4", texts)
    cfg = tcfg.parse(["--dataset", "c4", "--data-path", str(d), "--tokenizer", "byte", "--seq-len", "48",
                      "--eval-tokens", "400", "--global-batch", "2", "--micro-batch", "2", "--device", "cpu",
                      "--out-dir", str(tmp_path / "run")], world_size=1)
    data = build_datasets(cfg, 0, 1)
    tok = ByteTokenizer()
    expect_texts = list(buffer_shuffle(iter(texts)))
    assert expect_texts != texts
    expect, counted = [], 0
    for t in expect_texts:
        if counted >= 400:
            break
        row = tok.encode(t)[:48]
        expect.append(row + [tok.pad_token_id] * (48 - len(row)))
        counted += len(row)
    assert torch.equal(data.val, torch.tensor(expect))
    assert int((data.val != tok.pad_token_id).sum()) >= 400 > int((data.val[:-1] != tok.pad_token_id).sum())
    # Two ranks deal the same shuffled samples round-robin.
    n = len(expect) - len(expect) % 2
    for r in (0, 1):
        assert torch.equal(build_datasets(cfg, r, 2).val, data.val[:n][r::2])


def test_long_validation_documents_keep_eos():
    tok = EosByteTokenizer()
    rows = _doc_eval_rows(iter(["a" * 100, "bb"]), tok, seq_len=16, max_tokens=1000, pack=False)
    assert rows == [[ord("a")] * 15 + [tok.eos_token_id], [ord("b"), ord("b"), tok.eos_token_id]]
