"""Training data: the embedded default corpus, local C4 ``json.gz`` shards, the hub.

Two kinds of source, one contract (``next_micro() -> LongTensor [micro, seq]``,
``state_dict()`` / ``load_state_dict()``):

* :class:`IndexedWindows` (embedded text): the token stream is cut into fixed windows
  of ``seq_len``; step ``s`` uses global samples ``[s*G, (s+1)*G)`` of a per-epoch
  permutation (seeded), rank ``r`` takes the contiguous ``G/W`` slice ``r``.  The data
  position is therefore a pure function of the step: resuming needs only the step, and
  the global batch of a step does not depend on the world size.
* :class:`DocStream` (C4, local shards or hub streaming): documents are dealt round-robin
  to ranks (document ``i`` goes to rank ``i % W``, as ``split_dataset_by_node`` does);
  each rank turns its documents into samples either GaLore-style (one document per
  sample, truncated and padded to ``seq_len``, ``pack=False``) or packed (documents
  joined with EOS and cut into windows, ``pack=True``).  Its position is
  ``(documents consumed, leftover tokens)``: resuming skips lines without tokenizing.
"""
from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import zlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from .windows import IndexedWindows, eval_windows  # noqa: F401  (the recipe's datasets)

__all__ = [
    "ByteTokenizer",
    "embedded_text",
    "load_tokenizer",
    "IndexedWindows",
    "DocStream",
    "c4_local_files",
    "build_datasets",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS/EOS/PAD: vocab 259, nothing to download."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259
    name = "byte"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    """A thin adapter over ``transformers.AutoTokenizer`` (imported lazily)."""

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a dependency
            raise ValueError(f"tokenizer: {name_or_path!r} needs the 'transformers' package") from e
        try:
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as e:  # noqa: BLE001 - hub / path errors have many types
            raise ValueError(
                f"tokenizer: could not load {name_or_path!r} with transformers.AutoTokenizer "
                f"(a local directory or a hub name such as 't5-base'; offline machines need a local copy): {e}"
            ) from e
        self.name = name_or_path
        self.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.eos_token_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.pad_token_id
        self.bos_token_id = self.tok.bos_token_id
        if self.pad_token_id is None:
            raise ValueError(f"tokenizer: {name_or_path!r} has neither a pad nor an eos token")
        self.vocab_size = len(self.tok)

    def __len__(self) -> int:
        return self.vocab_size

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        # T5's tokenizer appends </s> itself; plain text otherwise (no BOS: GaLore's recipe).
        return self.tok(list(texts), add_special_tokens=True, verbose=False)["input_ids"]

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids):
        return self.tok.decode(ids)


def load_tokenizer(name: str):
    if name == "byte":
        return ByteTokenizer()
    return _HFTokenizer(name)


def embedded_text() -> str:
    """Real English prose that ships with every CPython: the ``pydoc`` topic help
    (the Language Reference sections, ~465 kB).  Keys are sorted so the corpus is the
    same on every machine with the same Python minor version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


# --------------------------------------------------------------------------- documents


def c4_local_files(data_path: str, split: str) -> List[str]:
    """``c4-<split>.*.json.gz`` (the allenai/c4 file names), sorted; also accepts
    ``<split>/*.json.gz`` / ``*.jsonl`` for hand-made sets."""
    patterns = [f"c4-{split}.*.json.gz", f"c4-{split}.*.json", f"{split}/*.json.gz", f"{split}*.jsonl",
                f"{split}*.jsonl.gz"]
    for pat in patterns:
        files = sorted(glob.glob(os.path.join(data_path, pat)))
        if files:
            return files
    raise ValueError(
        f"data_path: no {split} shards in {data_path!r} (expected files like c4-{split}.00000-of-01024.json.gz, "
        f"each line a JSON object with a 'text' field)"
    )


# What a damaged shard raises while being read: a bad gzip header, a truncated or
# corrupted deflate stream, bytes that are not UTF-8.
_SHARD_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError, OSError)


def _iter_local_docs(files: Sequence[str]) -> Iterator[str]:
    for f in files:
        opener = gzip.open if f.endswith(".gz") else open
        n = 0
        try:
            with opener(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    n += 1
                    if line.strip():
                        yield line
        except _SHARD_ERRORS as e:
            raise ValueError(f"data: shard {f!r} is damaged after {n} lines ({type(e).__name__}: {e})") from e


def _json_text(raw: str) -> str:
    """The ``text`` field of one JSON-lines record, or a ValueError that shows the record."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"data: a record is not valid JSON ({e}): {raw[:80]!r}") from e
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise ValueError(f"data: a record has no string 'text' field: {raw[:80]!r}")
    return rec["text"]


def check_first_record(path: str) -> None:
    """Open a shard and parse its first record (cheap; run at validation, before any
    work): a file that is not gzip, not UTF-8 or has no 'text' field fails here, naming it."""
    for raw in _iter_local_docs([path]):
        try:
            _json_text(raw)
        except ValueError as e:
            raise ValueError(f"{e} (first record of {path!r})") from None
        return
    raise ValueError(f"data: shard {path!r} holds no records")


def _iter_hub_docs(split: str, seed: int, rank: int = 0, world_size: int = 1) -> Iterator[str]:  # pragma: no cover
    """allenai/c4 'en' streamed (needs the network and `datasets`).  The train split is
    shuffled (seeded) and split by node the way GaLore does, so each rank downloads only
    its share; ``rank``/``world_size`` = 0/1 streams everything."""
    try:
        import datasets
        import datasets.distributed
    except ImportError as e:
        raise ValueError("dataset: streaming C4 from the hub needs `pip install datasets` (or pass --data-path)") from e
    ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    if split == "train":
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    else:   # GaLore's evaluation: val_data.shuffle(seed=42), datasets' default buffer
        ds = ds.shuffle(seed=seed, buffer_size=VAL_SHUFFLE_BUFFER)
    if world_size > 1:
        ds = datasets.distributed.split_dataset_by_node(ds, rank=rank, world_size=world_size)
    for ex in ds:
        yield ex["text"]


class DocStream:
    """Round-robin documents to ranks; samples per rank; resumable (see module doc)."""

    def __init__(self, doc_factory, tokenizer, seq_len: int, micro_batch: int, rank: int, world_size: int,
                 pack: bool, raw_json: bool, encode_chunk: int = 256, presharded: bool = False):
        self.doc_factory = doc_factory   # () -> iterator of raw lines / texts (restartable)
        self.presharded = presharded     # the factory already yields only this rank's documents
        self.tok, self.seq_len, self.micro = tokenizer, seq_len, micro_batch
        self.rank, self.world, self.pack, self.raw_json = rank, world_size, pack, raw_json
        self.encode_chunk = encode_chunk
        self.docs_read = 0         # documents of THIS rank read in the current pass
        self.passes = 0            # how many times the source wrapped around
        self.carry: List[int] = []          # packing remainder
        self._queue: List[List[int]] = []   # ready samples (token lists, unpadded when pack=False)
        self._it = None

    # -- reading
    def _open(self, skip: int) -> None:
        it = self.doc_factory()
        if not self.presharded:
            it = itertools.islice(it, self.rank, None, self.world)
        self._it = itertools.islice(it, skip, None)

    def _next_texts(self, k: int) -> List[str]:
        if self._it is None:
            self._open(self.docs_read)
        out = [_json_text(raw) if self.raw_json else raw for raw in itertools.islice(self._it, k)]
        self.docs_read += len(out)
        if out:
            return out
        if self.docs_read == 0:
            raise ValueError("data: the training source holds no documents for this rank")
        self.passes, self.docs_read = self.passes + 1, 0   # wrapped around: a new pass
        self._open(0)
        return self._next_texts(k)

    def _fill(self) -> None:
        texts = self._next_texts(self.encode_chunk)
        ids = self.tok.encode_batch(texts)
        eos = self.tok.eos_token_id
        for doc in ids:
            if self.pack:
                self.carry.extend(doc)
                if not doc or doc[-1] != eos:
                    self.carry.append(eos)
                while len(self.carry) >= self.seq_len:
                    self._queue.append(self.carry[: self.seq_len])
                    self.carry = self.carry[self.seq_len:]
            else:
                self._queue.append(truncate_keep_eos(doc, self.seq_len, eos))

    def next_micro(self) -> torch.Tensor:
        while len(self._queue) < self.micro:
            self._fill()
        rows, self._queue = self._queue[: self.micro], self._queue[self.micro:]
        out = torch.full((self.micro, self.seq_len), self.tok.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def state_dict(self) -> Dict:
        # The exact position: documents read so far (read-ahead included), the samples
        # made from them but not yet handed out, and the packing carry.
        return {"kind": "docs", "docs_read": self.docs_read, "passes": self.passes,
                "queue": [list(q) for q in self._queue], "carry": list(self.carry),
                "world_size": self.world}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("kind") != "docs":
            raise ValueError(f"resume: checkpoint data state is {state.get('kind')!r}, this run uses 'docs'")
        if int(state.get("world_size", self.world)) != self.world:
            raise ValueError(
                f"resume: the C4 stream was dealt to {state['world_size']} ranks, this run has {self.world}; "
                "resume with the same world size"
            )
        self.docs_read, self.passes = int(state["docs_read"]), int(state["passes"])
        self._queue, self.carry = [list(q) for q in state["queue"]], list(state["carry"])
        self._it = None

    @property
    def epoch(self) -> float:
        return float(self.passes)


def truncate_keep_eos(doc: List[int], seq_len: int, eos: Optional[int]) -> List[int]:
    """One document, one sample (``packing: pad``): a document longer than ``seq_len``
    ending in EOS keeps its EOS as the last token, as GaLore's
    ``tokenizer(..., max_length=L, truncation=True)`` does (T5 appends </s> after cutting)."""
    if len(doc) <= seq_len:
        return list(doc)
    if eos is not None and doc[-1] == eos:
        return list(doc[: seq_len - 1]) + [eos]
    return list(doc[:seq_len])


VAL_SHUFFLE_SEED = 42      # GaLore: val_data.shuffle(seed=42)
VAL_SHUFFLE_BUFFER = 1000  # datasets' default buffer of IterableDataset.shuffle


def buffer_shuffle(items: Iterator, seed: int = VAL_SHUFFLE_SEED, buffer_size: int = VAL_SHUFFLE_BUFFER) -> Iterator:
    """A seeded buffer shuffle of a stream (the scheme of datasets' streaming ``shuffle``):
    fill a buffer, then each new item replaces, and yields, a uniformly drawn slot; the
    rest leaves in random order at the end.  Deterministic for a seed; not the same
    permutation as the hub's (which also shuffles shard order) for local shards."""
    if buffer_size < 1:
        raise ValueError(f"buffer_size: must be >= 1, got {buffer_size}")
    gen = torch.Generator().manual_seed(seed)
    buf: List = []
    for x in items:
        if len(buf) < buffer_size:
            buf.append(x)
            continue
        i = int(torch.randint(buffer_size, (1,), generator=gen))
        yield buf[i]
        buf[i] = x
    for i in torch.randperm(len(buf), generator=gen).tolist():
        yield buf[i]


def _pad_rows(rows: List[List[int]], seq_len: int, pad: int) -> torch.Tensor:
    out = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:seq_len], dtype=torch.long)
    return out


def _doc_eval_rows(texts: Iterator[str], tok, seq_len: int, max_tokens: int, pack: bool,
                   min_rows: int = 1) -> List[List[int]]:
    """Validation samples (unpadded token lists) until they hold ``max_tokens`` non-pad
    tokens (and at least ``min_rows`` samples): GaLore's budget counts
    ``input_ids != pad`` (10M), not padded positions."""
    rows: List[List[int]] = []
    carry: List[int] = []
    chunk: List[str] = []
    counted = 0

    def more() -> bool:
        return counted < max_tokens or len(rows) < min_rows

    def flush():
        nonlocal carry, counted
        for doc in tok.encode_batch(chunk):
            if pack:
                carry.extend(doc + ([] if doc and doc[-1] == tok.eos_token_id else [tok.eos_token_id]))
                while len(carry) >= seq_len and more():
                    rows.append(carry[:seq_len])
                    counted += seq_len
                    carry = carry[seq_len:]
            elif more():
                row = truncate_keep_eos(doc, seq_len, tok.eos_token_id)
                if row:
                    rows.append(row)
                    counted += sum(1 for t in row if t != tok.pad_token_id)
        chunk.clear()

    for t in texts:
        chunk.append(t)
        if len(chunk) == 256:
            flush()
            if not more():
                break
    if chunk and more():
        flush()
    return rows


# --------------------------------------------------------------------------- build


class Datasets:
    def __init__(self, train, val: torch.Tensor, tokenizer, description: str):
        self.train, self.val, self.tokenizer, self.description = train, val, tokenizer, description


def build_datasets(cfg, rank: int, world_size: int) -> Datasets:
    """From the parsed config: the train source and this rank's validation samples."""
    tok = load_tokenizer(cfg.tokenizer)
    max_eval = max(world_size, cfg.eval_tokens // cfg.seq_len)
    if cfg.dataset == "pysource":   # installed Python source, byte tokens (mgup_dist/train/pysource.py)
        from .pysource import build_pysource

        train, val, desc = build_pysource(cfg, rank, world_size, max_eval)
        return Datasets(train, val, tok, desc)
    if cfg.dataset == "embedded":
        data = torch.tensor(list(embedded_text().encode("utf-8")), dtype=torch.long) if tok.name == "byte" else \
            torch.tensor([i for d in tok.encode_batch(embedded_text().split("\n\n")) for i in d], dtype=torch.long)
        split = int(data.numel() * 0.9)
        train = IndexedWindows(data[:split], cfg.seq_len, cfg.global_batch, cfg.micro_batch, rank, world_size,
                               seed=cfg.seed)
        val = eval_windows(data[split:], cfg.seq_len, max_eval, rank, world_size)
        desc = f"embedded pydoc_data.topics: {split} train / {data.numel() - split} val tokens ({tok.name})"
        return Datasets(train, val, tok, desc)

    assert cfg.dataset == "c4"
    if cfg.data_path:
        train_files = c4_local_files(cfg.data_path, "train")
        val_files = c4_local_files(cfg.data_path, "validation")
        train_factory = lambda: _iter_local_docs(train_files)  # noqa: E731
        # GaLore's evaluation: the validation split shuffled with seed 42 (see buffer_shuffle).
        val_texts = buffer_shuffle(_json_text(line) for line in _iter_local_docs(val_files))
        raw_json = True
        desc = f"C4 local shards: {len(train_files)} train / {len(val_files)} validation files in {cfg.data_path}"
    else:  # pragma: no cover - needs the network
        train_factory = lambda: _iter_hub_docs("train", cfg.seed, rank, world_size)  # noqa: E731
        val_texts = _iter_hub_docs("validation", VAL_SHUFFLE_SEED)
        raw_json = False
        desc = "C4 allenai/c4 'en' streamed from the hub"
    train = DocStream(train_factory, tok, cfg.seq_len, cfg.micro_batch, rank, world_size,
                      pack=cfg.packing == "pack", raw_json=raw_json, presharded=not cfg.data_path)
    # GaLore's definition: the shuffled validation split, samples until cfg.eval_tokens
    # non-pad tokens are counted.  Every rank reads the same documents and keeps its own
    # equal share.
    rows = _doc_eval_rows(val_texts, tok, cfg.seq_len, cfg.eval_tokens, pack=cfg.packing == "pack",
                          min_rows=world_size)
    n = len(rows) - len(rows) % world_size
    if n == 0:
        raise ValueError(f"data: the validation split yielded fewer than {world_size} samples")
    val = _pad_rows(rows[:n][rank::world_size], cfg.seq_len, tok.pad_token_id)
    return Datasets(train, val, tok, desc + f" ({tok.name}, {'packed' if cfg.packing == 'pack' else 'padded'})")
