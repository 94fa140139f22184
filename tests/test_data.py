"""Data of the recipe: C4-format json.gz shards, rank sharding, resumable positions, the
embedded corpus and byte tokenizer."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from mgup_dist.train import run
from mgup_dist.train.data import (
    ByteTokenizer,
    DocStream,
    IndexedWindows,
    _iter_local_docs,
    c4_local_files,
    embedded_text,
)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def write_c4(dir_, n_train=60, n_val=12, shards=2):
    """Shards named and shaped like allenai/c4 'en': one JSON object per line."""
    dir_.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, n in (("train", n_train), ("validation", n_val)):
        per = n // shards
        for s in range(shards):
            with gzip.open(dir_ / f"c4-{split}.{s:05d}-of-{shards:05d}.json.gz", "wt", encoding="utf-8") as f:
                for i in range(per):
                    words = [WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(5 + k % 40)]
                    f.write(json.dumps({"text": f"doc {k}: " + " ".join(words) + ".",
                                        "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{k}"}) + "\n")
                    k += 1
    return dir_


def _stream(files, rank, world, pack, micro=2, seq=48):
    return DocStream(lambda: _iter_local_docs(files), ByteTokenizer(), seq, micro, rank, world, pack=pack,
                     raw_json=True, encode_chunk=5)


def test_c4_shards_found_and_read(tmp_path):
    d = write_c4(tmp_path / "c4")
    train = c4_local_files(str(d), "train")
    assert [f.split("/")[-1] for f in train] == ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"]
    docs = [json.loads(x)["text"] for x in _iter_local_docs(train)]
    assert len(docs) == 60 and docs[0].startswith("doc 0:") and docs[-1].startswith("doc 59:")
    with pytest.raises(ValueError, match="data_path: no validation shards"):
        c4_local_files(str(tmp_path), "validation")


@pytest.mark.parametrize("pack", [False, True])
def test_doc_stream_shards_by_rank_and_resumes_exactly(tmp_path, pack):
    files = c4_local_files(str(write_c4(tmp_path / "c4")), "train")
    tok = ByteTokenizer()
    # Rank sharding: document i goes to rank i % 2 (pad mode: one document per sample).
    if not pack:
        seen = {r: [] for r in (0, 1)}
        for r in (0, 1):
            s = _stream(files, r, 2, pack=False, seq=400)
            for _ in range(3):
                for row in s.next_micro():
                    seen[r].append(int(tok.decode(row.tolist()).split(":")[0].split()[1]))
        assert seen[0] == [0, 2, 4, 6, 8, 10] and seen[1] == [1, 3, 5, 7, 9, 11]
    # Resume: the state after 7 micro-batches continues exactly like the uninterrupted stream,
    # through a wrap-around of the 30 documents of this rank.
    ref = _stream(files, 1, 2, pack)
    full = [ref.next_micro() for _ in range(40)]
    a = _stream(files, 1, 2, pack)
    for _ in range(7):
        a.next_micro()
    state = json.loads(json.dumps(a.state_dict()))   # it must survive serialisation
    b = _stream(files, 1, 2, pack)
    b.load_state_dict(state)
    rest = [b.next_micro() for _ in range(33)]
    for x, y in zip(full[7:], rest):
        assert torch.equal(x, y)
    assert b.epoch >= 1   # wrapped around
    if pack:   # packed samples hold no padding
        assert all((m != tok.pad_token_id).all() for m in full)
    else:
        assert any((m == tok.pad_token_id).any() for m in full)
    with pytest.raises(ValueError, match="world size"):
        _stream(files, 0, 4, pack).load_state_dict(state)


def test_indexed_windows_step_position_and_world_size_independence():
    tokens = torch.arange(10_000)
    one = IndexedWindows(tokens, 16, global_batch=8, micro_batch=4, rank=0, world_size=1, seed=3)
    steps_one = [torch.cat([one.next_micro() for _ in range(2)]) for _ in range(5)]
    two = [IndexedWindows(tokens, 16, global_batch=8, micro_batch=2, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for s in range(5):
        parts = [torch.cat([w.next_micro() for _ in range(2)]) for w in two]
        assert torch.equal(torch.cat(parts), steps_one[s])   # same global batch at every world size
    again = IndexedWindows(tokens, 16, 8, 4, 0, 1, seed=3)
    again.load_state_dict({"kind": "indexed", "step": 3})
    assert torch.equal(torch.cat([again.next_micro(), again.next_micro()]), steps_one[3])
    assert len({tuple(w[:, 0].tolist()) for w in steps_one}) == 5


def test_embedded_corpus_and_byte_tokenizer():
    text = embedded_text()
    assert len(text) > 300_000 and "assert" in text
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert max(ids) < 256 and tok.decode(ids) == "héllo" and len(tok) == 259


@pytest.mark.timeout(120)
def test_train_on_local_c4_shards(tmp_path):
    d = write_c4(tmp_path / "c4", n_train=200, n_val=40)
    out = tmp_path / "run"
    s = run(["--data-path", str(d), "--tokenizer", "byte", "--steps", "10", "--eval-every", "5", "--log-every", "5",
             "--global-batch", "4", "--seq-len", "64", "--eval-tokens", "1024", "--out-dir", str(out),
             "--no-progress", "--no-plots", "--no-tensorboard", "--resume", "never"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "c4" and cfg["packing"] == "pad"
    assert s["steps"] == 10 and math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < 5.0
    state = torch.load(out / "checkpoints" / "step_00000010" / "trainer_state.pt", weights_only=True)
    data_state = state["per_rank"][0]["data"]
    assert data_state["kind"] == "docs" and data_state["docs_read"] >= 40   # 10 steps x 4 one-document samples


def _save_word_tokenizer(path):
    """A small real transformers tokenizer (word level over WORDS), saved like a hub one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"<extra_{i}>": 3 + i for i in range(300)})   # real words get ids > 300
    for w in WORDS + ["doc"] + [str(i) for i in range(200)]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(str(path))
    return len(vocab)


@pytest.mark.timeout(120)
def test_train_with_a_transformers_tokenizer_path(tmp_path):
    n_vocab = _save_word_tokenizer(tmp_path / "tok")
    d = write_c4(tmp_path / "c4", n_train=100, n_val=20)
    common = ["--data-path", str(d), "--tokenizer", str(tmp_path / "tok"), "--steps", "4", "--eval-every", "4",
              "--global-batch", "4", "--seq-len", "32", "--eval-tokens", "512", "--packing", "pack", "--no-progress",
              "--no-plots", "--no-tensorboard", "--resume", "never"]
    # The tiny model's byte vocabulary (259) is too small for ids up to n_vocab: a clear error first ...
    with pytest.raises(ValueError, match="vocab_size"):
        run(common + ["--out-dir", str(tmp_path / "a")])
    # ... and with --vocab-size auto the model follows the tokenizer.
    s = run(common + ["--vocab-size", "auto", "--out-dir", str(tmp_path / "b")])
    assert s["steps"] == 4 and math.isfinite(s["final_val_loss"]) and s["final_val_loss"] < math.log(n_vocab) + 1
