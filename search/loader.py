"""Batches: the resumable, shuffled training `Loader`, and the validation span for bits per byte.

Training windows: each shard is cut at stride T into windows of T+1 tokens (inputs and targets
overlap by T), windows never cross a shard boundary, and each epoch visits them in a permutation
drawn from a `torch.Generator` seeded by (seed, epoch). The position is (epoch, step), so a
restored loader yields exactly what the original would have yielded next.

Validation (`val_batches`): the first whole validation documents up to `max_bytes` UTF-8 bytes.
Documents have the same bytes under every tokenizer, so BPE and byte models are scored on the
same text. Every token after the first is a target position exactly once; zero-byte (special)
targets are masked to -1, so the loss covers exactly `span_bytes` bytes and

    bits per byte = total next-token NLL in nats / (ln 2 * span_bytes)

(never divided by the token count: tokens differ between tokenizers, bytes do not).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from search.shards import DataError


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch); hashing keeps nearby pairs unrelated."""
    digest = hashlib.sha256(f"lm-playground/loader/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned memory and an asynchronous copy on CUDA; a no-op on the CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Loader:
    """Shuffled (x, y) int64 batches of shape (batch_size, seq_len), y = x shifted by one.

    Infinite: `next(loader)` moves into the next epoch after `len(loader)` steps. With `world`
    ranks, a step's global batch is batch_size * world windows and rank r takes the r-th
    batch_size of them.
    """

    def __init__(self, arrays: Sequence[np.ndarray], batch_size: int, seq_len: int, *,
                 seed: int = 0, rank: int = 0, world: int = 1, device: str = "cpu",
                 side: Sequence[np.ndarray] | None = None, feed=None):
        """`side`: per-position values aligned with `arrays` (BLT's cached entropies); each batch
        hands `feed` the float32 [batch_size, seq_len] of its inputs' positions."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        if side is not None and [len(a) for a in side] != [len(a) for a in arrays]:
            raise DataError("the side arrays (cached entropies) do not match the shards' lengths")
        self.side, self.feed = (list(side), feed) if side is not None else (None, None)
        self.arrays, self.batch_size, self.seq_len = list(arrays), batch_size, seq_len
        self.seed, self.rank, self.world = seed, rank, world
        self.device = torch.device(device)
        counts = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(counts)])  # first window index per shard
        self.n_windows = int(self.first[-1])
        self.steps_per_epoch = self.n_windows // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DataError(f"{sum(len(a) for a in self.arrays):,} tokens make {self.n_windows} "
                            f"windows of {seq_len + 1}, fewer than one global batch of "
                            f"{batch_size * world}; use more data or a smaller batch")
        self.epoch, self.step = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order in which `epoch` visits the windows."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n_windows, generator=g))
        return self._perm[1]

    def window_ids(self, epoch: int, step: int) -> list[int]:
        """This rank's window indices at (epoch, step)."""
        start = (step * self.world + self.rank) * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size].tolist()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (same as `next(loader)`)."""
        return self.__next__()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        ids = self.window_ids(self.epoch, self.step)
        self.step += 1
        return self.gather(ids)

    def gather(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for the given window indices, read from the memory maps."""
        T = self.seq_len
        pin = self.device.type == "cuda"
        x = torch.empty((len(ids), T), dtype=torch.int64, pin_memory=pin)
        y = torch.empty((len(ids), T), dtype=torch.int64, pin_memory=pin)
        xn, yn = x.numpy(), y.numpy()
        e = torch.empty((len(ids), T), dtype=torch.float32, pin_memory=pin) if self.side else None
        en = e.numpy() if e is not None else None
        for row, w in enumerate(ids):
            shard = int(np.searchsorted(self.first, w, side="right")) - 1
            start = (w - int(self.first[shard])) * T
            chunk = self.arrays[shard][start:start + T + 1]
            xn[row], yn[row] = chunk[:-1], chunk[1:]
            if en is not None:
                en[row] = self.side[shard][start:start + T]
        if e is not None:
            self.feed(e.to(self.device, non_blocking=pin))
        if pin:  # already pinned: copy asynchronously
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def state_dict(self) -> dict:
        """The exact position (plus the settings that give it meaning)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world": self.world,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses one taken with other data or batch settings."""
        for key in ("seed", "batch_size", "seq_len", "world", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]}, this loader "
                                 f"{getattr(self, key)}: the position would mean other batches")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


# ---------------------------------------------------------------- validation in bits per byte


@dataclass
class ValSpan:
    """The scored token stream: `tokens[0]` is a zero-byte EOT, the targets are `tokens[1:]`."""

    tokens: np.ndarray
    n_docs: int
    span_bytes: int


def _val_prefix(arrays: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The first n tokens of the concatenated validation shards, as int64."""
    parts, left = [], n
    for arr in arrays:
        if left <= 0:
            break
        parts.append(np.asarray(arr[:left], dtype=np.int64))
        left -= len(parts[-1])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _doc_starts(s: np.ndarray, eot: int, placement: str) -> np.ndarray:
    """Where documents begin: at each EOT when prepended, just after each when appended."""
    at = np.flatnonzero(s == eot)
    starts = at if placement == "prepend" else at + 1
    return np.union1d([0], starts[starts < len(s)])


def _fitting_docs(dataset, tokenizer, max_bytes: int, window: int = 1 << 20):
    """Whole validation documents in order, each taken while it still fits in `max_bytes` (longer
    ones skipped), among those ending within the first `window` bytes of text; (tokens, count)
    or None. A prefix of 2 * window tokens holds all of those whole under any tokenizer (every
    non-EOT token is at least one byte), so every tokenizer picks the same documents."""
    s = _val_prefix(dataset.val, 2 * window)
    starts = _doc_starts(s, tokenizer.eot, dataset.eot_placement)
    ends = np.append(starts[1:], len(s))
    if len(s) == 2 * window:  # the last document may go on past the prefix
        starts, ends = starts[:-1], ends[:-1]
    cum = np.concatenate([[0], np.cumsum(tokenizer.token_bytes[s])])
    picked, total = [], 0
    for a, b in zip(starts, ends):
        size = int(cum[b] - cum[a])
        if cum[b] > window or total >= max_bytes:
            break
        if 0 < size <= max_bytes - total:
            picked.append(s[a:b])
            total += size
    return (np.concatenate(picked), len(picked)) if picked else None


def val_span(dataset, tokenizer, max_bytes: int) -> ValSpan:
    """The first whole validation documents totalling at most `max_bytes` bytes. When the first
    document alone is longer, the documents that fit, in order, skipping longer ones (so a small
    budget stays small on CPU), else the first document: a document is never cut. Chosen by
    bytes, so every tokenizer scores the same text."""
    if dataset.tokenizer != tokenizer.name:
        raise DataError(f"dataset {dataset.name} holds {dataset.tokenizer} tokens, not "
                        f"{tokenizer.name} ones")
    n = max(1 << 16, 2 * max_bytes)
    while True:
        s = _val_prefix(dataset.val, n)
        exhausted = len(s) < n
        starts = _doc_starts(s, tokenizer.eot, dataset.eot_placement)
        ends = np.append(starts[1:], len(s))
        complete = len(starts) if exhausted else len(starts) - 1  # the last may go on
        cum = np.cumsum(tokenizer.token_bytes[s])
        k = int(np.searchsorted(cum[ends[:complete] - 1], max_bytes, side="right"))
        if k < complete or exhausted:
            break
        n *= 2  # every selected document was complete: there may be room for more
    if complete == 0 or len(s) == 0:
        raise DataError(f"dataset {dataset.name}: no validation tokens")
    if k == 0:  # the first document alone is longer: the documents that fit, else the first
        fit = _fitting_docs(dataset, tokenizer, max_bytes)
        span, k = fit if fit is not None else (s[starts[0]:ends[0]], 1)
    else:
        span = s[:ends[k - 1]]
    if tokenizer.token_bytes[span[0]] > 0:  # no leading EOT (appended EOTs): add one so that
        span = np.concatenate([[tokenizer.eot], span])  # the first byte is a target too
    return ValSpan(span, k, int(tokenizer.token_bytes[span].sum()))


class ValBatches:
    """Iterable of (x, y) int64 (batch, seq_len) batches over a `ValSpan`; y = -1 is not scored.

    The stream is cut at stride seq_len (each window's context starts afresh); the last window is
    padded (x with EOT, y with -1) and the last batch with fully masked rows, so shapes never
    change. With `world` ranks, batch i goes to rank i % world.
    """

    def __init__(self, span: ValSpan, tokenizer, seq_len: int, batch: int, *,
                 device: str = "cpu", rank: int = 0, world: int = 1):
        self.span, self.seq_len, self.batch, self.eot = span, seq_len, batch, tokenizer.eot
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.span_bytes, self.n_docs = span.span_bytes, span.n_docs
        L = len(span.tokens)
        self.n_windows = max(1, math.ceil((L - 1) / seq_len))
        padded = np.full(self.n_windows * seq_len + 1, tokenizer.eot, dtype=np.int64)
        padded[:L] = span.tokens
        scored = np.zeros(len(padded), dtype=bool)
        scored[1:L] = tokenizer.token_bytes[span.tokens[1:]] > 0
        self.x = padded[:-1].reshape(self.n_windows, seq_len)
        self.y = np.where(scored, padded, -1)[1:].reshape(self.n_windows, seq_len)
        self.n_targets = int(scored.sum())
        self.n_batches = math.ceil(self.n_windows / batch)

    def __len__(self) -> int:
        return len(range(self.rank, self.n_batches, self.world))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.rank, self.n_batches, self.world):
            x = np.full((self.batch, self.seq_len), self.eot, dtype=np.int64)
            y = np.full((self.batch, self.seq_len), -1, dtype=np.int64)
            rows = self.x[i * self.batch:(i + 1) * self.batch]
            x[:len(rows)] = rows
            y[:len(rows)] = self.y[i * self.batch:(i + 1) * self.batch]
            yield (_to_device(torch.from_numpy(x), self.device),
                   _to_device(torch.from_numpy(y), self.device))


def val_batches(dataset, tokenizer, seq_len: int, batch: int, max_bytes: int, *,
                device: str = "cpu", rank: int = 0, world: int = 1) -> ValBatches:
    """Validation batches over the first documents up to `max_bytes` bytes; see `ValBatches`.

    Sum the NLL (nats) over targets y != -1 across all batches (and ranks), then
    `bits_per_byte(total, batches.span_bytes)`.
    """
    return ValBatches(val_span(dataset, tokenizer, max_bytes), tokenizer, seq_len, batch,
                      device=device, rank=rank, world=world)


def bits_per_byte(total_nll_nats: float, span_bytes: int) -> float:
    """BPB = total next-token NLL in nats / (ln 2 * UTF-8 bytes scored)."""
    return total_nll_nats / (math.log(2) * span_bytes)
