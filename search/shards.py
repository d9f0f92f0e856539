"""Token shard files: reading and writing llm.c `.bin`, reading `.npy` and raw uint16, hashing.

The canonical format is llm.c's: a header of 256 little-endian int32 (`[0]` magic, `[1]` version,
`[2]` token count) followed by the tokens, uint16 (magic 20240520, version 1) or uint32 (magic
20240801, version 7). It is what llm.c, modded-nanogpt and the fineweb10B shards use.
Shards are memory-mapped read-only, never loaded whole. Every problem a user can cause (a
truncated download, a wrong file) raises `DataError` naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LLMC_FORMATS = {20240520: (1, np.dtype("<u2")), 20240801: (7, np.dtype("<u4"))}
LLMC_EVAL_MAGIC = 20240522  # llm.c's eval files (HellaSwag etc.), not token streams
MANIFEST = "manifest.json"
HASH_EDGE = 1 << 20  # hash the first and last MiB of each file: cheap but identifying
REMAKE = "re-create it (python -m search.data prepare ...) or download it again"


class DataError(ValueError):
    """Token data that cannot be used; the message names the file and says what to do."""


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary sibling for writing and move it over `path` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def token_dtype(max_id: int) -> np.dtype:
    """uint16 when every id fits (half the disk and bandwidth), else uint32."""
    return np.dtype("<u2") if max_id < 1 << 16 else np.dtype("<u4")


def write_shard(path: str | Path, tokens, *, dtype=None) -> Path:
    """Write one llm.c shard atomically; dtype defaults to the smallest of uint16/uint32."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    if lo < 0 or hi >= 1 << 32:
        raise ValueError(f"token ids must lie in [0, 2**32); got {lo}..{hi}")
    dtype = token_dtype(hi) if dtype is None else np.dtype(dtype).newbyteorder("<")
    magic = {np.dtype("<u2"): 20240520, np.dtype("<u4"): 20240801}.get(dtype)
    if magic is None:
        raise ValueError(f"llm.c shards hold uint16 or uint32 tokens, not {dtype}")
    if hi > np.iinfo(dtype).max:
        raise ValueError(f"token id {hi} does not fit {dtype.name}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, LLMC_FORMATS[magic][0], tokens.size
    with atomic_write(Path(path)) as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype, copy=False).tobytes())
    return Path(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map the tokens of an llm.c shard after checking its header against its size."""
    path = Path(path)
    size = _size(path)
    if size == 0:
        raise DataError(f"{path}: the file is empty; an llm.c shard starts with a "
                        f"{HEADER_BYTES}-byte header. {REMAKE}")
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size:,} bytes is shorter than the {HEADER_BYTES}-byte llm.c "
                        f"header: truncated or not a shard. {REMAKE}")
    magic, version, count = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic == LLMC_EVAL_MAGIC:
        raise DataError(f"{path}: magic {magic} marks an llm.c eval file, not a token shard")
    if magic not in LLMC_FORMATS:
        raise DataError(f"{path}: unknown magic {magic}; llm.c token shards have 20240520 "
                        "(uint16) or 20240801 (uint32). A nanoGPT headerless uint16 file must be "
                        "declared as raw_u16:DIR")
    want_version, dtype = LLMC_FORMATS[magic]
    if version != want_version:
        raise DataError(f"{path}: magic {magic} comes with version {want_version}, but the header "
                        f"says {version}: corrupt header or an unsupported llm.c format")
    held, stray = divmod(size - HEADER_BYTES, dtype.itemsize)
    if count < 0 or held != count or stray:
        extra = f" and {stray} stray byte(s)" if stray else ""
        raise DataError(f"{path}: header says {count:,} tokens but the file holds {held:,}{extra}: "
                        f"truncated or corrupt. {REMAKE}")
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def read_npy(path: str | Path) -> np.ndarray:
    """Memory-map a build-nanogpt `.npy` shard (1-D unsigned integers)."""
    path = Path(path)
    _size(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e}). {REMAKE}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise DataError(f"{path}: expected a 1-D integer token array, got {arr.dtype} "
                        f"with shape {arr.shape}")
    return arr


def read_raw_u16(path: str | Path) -> np.ndarray:
    """Memory-map a nanoGPT headerless uint16 file (`train.bin` / `val.bin`)."""
    path = Path(path)
    size = _size(path)
    if size % 2:
        raise DataError(f"{path}: {size:,} bytes is odd, so not raw uint16 tokens")
    if size == 0:
        return np.empty(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r")


def read_tokens(path: str | Path, fmt: str = "auto") -> np.ndarray:
    """Read a token file: `llmc` / `npy` / `raw_u16`; `auto` picks llm.c for .bin, npy for .npy."""
    path = Path(path)
    if fmt == "auto":
        fmt = "npy" if path.suffix == ".npy" else "llmc"
    readers = {"llmc": read_shard, "npy": read_npy, "raw_u16": read_raw_u16}
    if fmt not in readers:
        raise DataError(f"{path}: unknown token format {fmt!r}; one of {', '.join(readers)}")
    return readers[fmt](path)


def files_hash(paths: Sequence[Path]) -> str:
    """sha256 over each file's name, size and first and last MiB, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        size = _size(Path(path))
        h.update(f"{Path(path).name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(HASH_EDGE))
            if size > HASH_EDGE:
                f.seek(max(HASH_EDGE, size - HASH_EDGE))
                h.update(f.read(HASH_EDGE))
    return h.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write `manifest.json` atomically (after the shards it describes)."""
    with atomic_write(Path(folder) / MANIFEST) as f:
        f.write((json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); delete it or re-create the data") from None
    if not isinstance(manifest, dict) or not {"train", "val", "tokenizer"} <= manifest.keys():
        raise DataError(f"{path}: not an lm-playground manifest (needs train, val, tokenizer)")
    return manifest


class ShardWriter:
    """Streams documents into `<prefix>_<split>_NNNNNN.bin` shards of `shard_tokens` tokens."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_tokens: int, dtype):
        if shard_tokens < 1:
            raise ValueError("shard_tokens must be positive")
        self.folder, self.prefix, self.split = Path(folder), prefix, split
        self.shard_tokens, self.dtype = shard_tokens, np.dtype(dtype)
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.shards: list[dict] = []
        self.documents = 0

    def add(self, doc: np.ndarray) -> None:
        """Append one document's tokens (already carrying its EOT); full shards go to disk."""
        self.pending.append(np.asarray(doc, dtype=self.dtype))
        self.n_pending += len(doc)
        self.documents += 1
        while self.n_pending >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.folder / name, stream[:n], dtype=self.dtype)
        self.shards.append({"file": name, "tokens": int(n)})
        self.pending = [stream[n:]]
        self.n_pending = len(stream) - n

    def close(self) -> list[dict]:
        """Write the last partial shard; returns [{file, tokens}] for the manifest."""
        if self.n_pending:
            self._flush(self.n_pending)
        return self.shards
