"""Fixed windows over one token tensor, for corpora held whole in memory (the embedded
text, installed Python source): the position of a batch is a function of the optimizer
step, so a resumed run continues exactly where it stopped."""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["IndexedWindows", "eval_windows"]


class IndexedWindows:
    """Fixed windows over one token tensor; position = optimizer step (see module doc)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, seed: int = 0):
        n = tokens.numel() // seq_len
        if n < 1:
            raise ValueError(f"seq_len: {seq_len} is longer than the whole corpus ({tokens.numel()} tokens)")
        assert global_batch % (micro_batch * world_size) == 0
        self.windows = tokens[: n * seq_len].view(n, seq_len)
        self.n = n
        self.seq_len, self.global_batch, self.micro = seq_len, global_batch, micro_batch
        self.rank, self.world = rank, world_size
        self.per_rank = global_batch // world_size
        self.seed = seed
        self.step = 0
        self._micro_idx = 0
        self._perm_epoch, self._perm = -1, None

    def _sample(self, g: int) -> torch.Tensor:
        epoch, i = divmod(g, self.n)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self.windows[self._perm[i]]

    def next_micro(self) -> torch.Tensor:
        base = self.step * self.global_batch + self.rank * self.per_rank + self._micro_idx * self.micro
        batch = torch.stack([self._sample(base + j) for j in range(self.micro)])
        self._micro_idx += 1
        if self._micro_idx * self.micro == self.per_rank:
            self._micro_idx, self.step = 0, self.step + 1
        return batch

    @property
    def epoch(self) -> float:
        return self.step * self.global_batch / self.n

    def state_dict(self) -> Dict:
        assert self._micro_idx == 0, "data state is only saved at step boundaries"
        return {"kind": "indexed", "step": self.step}

    def load_state_dict(self, state: Dict) -> None:
        if state.get("kind") != "indexed":
            raise ValueError(f"resume: checkpoint data state is {state.get('kind')!r}, this run uses 'indexed'")
        self.step, self._micro_idx = int(state["step"]), 0


def eval_windows(tokens: torch.Tensor, seq_len: int, max_samples: int, rank: int, world_size: int) -> torch.Tensor:
    """Validation windows for this rank: every rank gets the same count (FSDP and
    DeepSpeed ZeRO-3 need every rank to run the same number of forwards)."""
    n = min(tokens.numel() // seq_len, max_samples)
    n -= n % world_size
    if n == 0:
        raise ValueError(f"eval: the validation split holds fewer than {world_size} windows of {seq_len} tokens")
    return tokens[: n * seq_len].view(n, seq_len)[rank::world_size]
