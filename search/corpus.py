"""Turning text documents into token shards: the split rule, the built-in corpus and its cache.

Train/validation split, for every corpus we tokenise ourselves: by document (file), a document
being validation iff `int(sha1(relative_posix_path), 16) % 10_000 < round(val_share * 10_000)`
(val_share 0.02 by default, so about one file in fifty). It depends only on the path, so it is
the same for every tokenizer and stays put as files are added. Each document is tokenised as
`[EOT] + tokens` (EOT prepended, llm.c style: it doubles as BOS). `prepare_folder` treats every
UTF-8 file of a folder as a document; a single text file is cut by lines instead (its last
`val_share` of lines is validation).

The built-in corpus is the standard library's `.py` sources (`sysconfig` "stdlib"), in sorted
relative-path order, skipping `site-packages`, `__pycache__` and any file that cannot be read as
UTF-8. It is cached under `$LM_PLAYGROUND_HOME/corpus/`:
- `keys/<listing_key[:32]>.json`: listing key (sha256 of each path, size and mtime) -> source hash,
  so a cache hit only stats the files and never reads them;
- `<source_hash[:16]>-<tokenizer>/`: `stdlib_{train,val}_NNNNNN.bin` shards and `manifest.json`,
  whose `source_hash` is sha256 over every relative path and file's bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from search.shards import (HEADER_BYTES, DataError, ShardWriter, atomic_write, files_hash,
                           read_manifest, token_dtype, write_manifest)
from search.tokenizer import Tokenizer, playground_home

VAL_SHARE = 0.02
SPLIT_BUCKETS = 10_000
SHARD_TOKENS = 100_000_000  # the llm.c / fineweb10B shard size
CORPUS_VERSION = 1  # bump when gathering or tokenising rules change: it invalidates the cache
TEXT_BATCH_CHARS = 8 << 20  # text handed to the tokenizer at once: keeps memory flat

Doc = tuple[str, str]  # (relative posix path, text)


def bucket(rel_path: str) -> int:
    """The document's split bucket in [0, 10_000): from the sha1 of its relative path."""
    return int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % SPLIT_BUCKETS


def is_val(rel_path: str, share: float = VAL_SHARE) -> bool:
    """The split rule: a document is validation iff its bucket is below share * 10_000."""
    return bucket(rel_path) < round(share * SPLIT_BUCKETS)


def val_names(names: list[str], share: float = VAL_SHARE) -> set[str]:
    """The validation documents: `is_val`, except that both sides keep at least one document.

    When the rule picks none (a small folder), the lowest-bucket document is validation; when it
    picks all, the highest-bucket one is training.
    """
    if len(names) < 2:
        raise DataError(f"{len(names)} document(s) cannot be split into train and validation")
    val = {n for n in names if is_val(n, share)}
    ranked = sorted(names, key=lambda n: (bucket(n), n))
    if not val:
        val = {ranked[0]}
    if len(val) == len(names):
        val.discard(ranked[-1])
    return val


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    """Groups of about TEXT_BATCH_CHARS of text: big enough for threads, small for memory."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc[1])
        if size >= TEXT_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenise_documents(docs: Iterable[Doc], tok: Tokenizer, out: Path, name: str, *,
                       val: set[str], total_bytes: int | None = None,
                       shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict:
    """Tokenise documents, in order, into `out/<name>_{train,val}_NNNNNN.bin`.

    `val` names the validation documents. Returns the manifest's facts about the shards.
    """
    from tqdm import tqdm

    dtype = token_dtype(tok.vocab_size - 1)
    writers = {s: ShardWriter(out, name, s, shard_tokens, dtype) for s in ("train", "val")}
    eot = np.array([tok.eot], dtype=np.uint32)
    val_docs, n_bytes, t0 = [], 0, time.perf_counter()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
              desc=f"tokenising {name} ({tok.name})") as bar:
        for batch in _batches(docs):
            for (rel, text), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                writers["val" if rel in val else "train"].add(np.concatenate([eot, ids]))
                val_docs += [rel] if rel in val else []
                size = len(text.encode("utf-8"))
                n_bytes += size
                bar.update(size)
    shards = {s: w.close() for s, w in writers.items()}
    for split, shard_list in shards.items():
        if not shard_list:
            raise DataError(f"{out}: no {split} documents were written; add readable text")
    paths = [out / e["file"] for s in ("train", "val") for e in shards[s]]
    return {"format": "lm-playground-shards", "version": 1, "name": name,
            "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot": tok.eot,
            "eot_placement": "prepend", "dtype": dtype.name, **shards,
            "documents": {s: w.documents for s, w in writers.items()},
            "tokens": {s: sum(e["tokens"] for e in shards[s]) for s in shards},
            "bytes": n_bytes, "val_documents": val_docs, "content_hash": files_hash(paths),
            "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------- reading text files


def list_files(root: Path, suffix: str = "", skip_dirs: tuple[str, ...] = ()) -> list[tuple]:
    """(relative posix path, path, size, mtime_ns) of regular files under root, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs and not d.startswith("."))
        for name in names:
            path = Path(folder, name)
            if not name.endswith(suffix) or name.startswith(".") or not path.is_file():
                continue
            st = path.stat()
            found.append((path.relative_to(root).as_posix(), path, st.st_size, st.st_mtime_ns))
    return sorted(found)


class DocReader:
    """Iterates the listed UTF-8 files as documents, one at a time, hashing what it yields.

    Files that cannot be read or decoded are skipped and named in `skipped`; `source_hash`
    (sha256 over each relative path, length and bytes) is complete once iteration ends.
    """

    def __init__(self, listing: list[tuple]):
        self.listing, self.skipped, self._hash = listing, [], hashlib.sha256()

    def __iter__(self) -> Iterator[Doc]:
        for rel, path, _, _ in self.listing:
            try:
                data = Path(path).read_bytes()
                text = data.decode("utf-8")  # the bytes as on disk: no newline translation
            except (OSError, UnicodeDecodeError):
                self.skipped.append(rel)
                continue
            self._hash.update(f"{rel}\0{len(data)}\0".encode())
            self._hash.update(data)
            yield rel, text

    @property
    def source_hash(self) -> str:
        return self._hash.hexdigest()


def _split_rule(share: float) -> str:
    return (f"val iff int(sha1(relative_path), 16) % {SPLIT_BUCKETS} < "
            f"{round(share * SPLIT_BUCKETS)} (at least one document on each side)")


def _tokenise_into(folder: Path, docs: Iterable[Doc], tok: Tokenizer, name: str, extra: dict,
                   **kw) -> dict:
    """Tokenise, then write the manifest last: a folder with a manifest is complete."""
    manifest = tokenise_documents(docs, tok, folder, name, **kw)
    if isinstance(docs, DocReader):  # known only now that every file has been read
        manifest.update(source_hash=docs.source_hash, skipped=docs.skipped)
    manifest.update(extra)
    write_manifest(folder, manifest)
    return manifest


# ---------------------------------------------------------------- the built-in corpus


def stdlib_listing() -> tuple[Path, list[tuple]]:
    """The standard library's root and its `.py` files (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, list_files(root, ".py", ("site-packages", "__pycache__"))


def listing_key(root: Path, listing: list[tuple]) -> str:
    """A cheap cache key: sha256 over the rule version, root, and each path, size and mtime."""
    h = hashlib.sha256(f"{CORPUS_VERSION}\0{root}\n".encode())
    for rel, _, size, mtime in listing:
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _cached(folder: Path, tokenizer: str) -> dict | None:
    """The folder's manifest when it is a complete cache for this tokenizer, else None."""
    try:
        manifest = read_manifest(folder)
    except DataError:
        return None
    if (manifest is None or manifest.get("tokenizer") != tokenizer
            or manifest.get("corpus_version") != CORPUS_VERSION):
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for entry in manifest["train"] + manifest["val"]:
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != HEADER_BYTES + entry["tokens"] * itemsize:
            return None
    return manifest


def _known_hash(keyfile: Path) -> str | None:
    try:
        return json.loads(keyfile.read_text())["source_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def builtin_folder(tok: Tokenizer, *, home: Path | None = None, progress: bool = True) -> Path:
    """The cached shard folder of the built-in corpus for `tok`, building it on first use."""
    corpus = Path(home or playground_home()) / "corpus"
    root, listing = stdlib_listing()
    keyfile = corpus / "keys" / f"{listing_key(root, listing)[:32]}.json"
    source_hash = _known_hash(keyfile)
    if source_hash and _cached(corpus / f"{source_hash[:16]}-{tok.name}", tok.name):
        return corpus / f"{source_hash[:16]}-{tok.name}"  # the fast path: stats, no reads
    reader = DocReader(listing)
    docs = list(reader)  # about 30 MB, read whole: its hash names the cache folder
    if len(docs) < 2:
        raise DataError(f"{root}: too few readable .py files for the built-in corpus")
    source_hash = reader.source_hash
    folder = corpus / f"{source_hash[:16]}-{tok.name}"
    if not _cached(folder, tok.name):
        extra = {"source": str(root), "source_hash": source_hash, "skipped": reader.skipped,
                 "split_rule": _split_rule(VAL_SHARE), "corpus_version": CORPUS_VERSION,
                 "python": sys.version.split()[0]}
        # Built beside the final folder and renamed into place, so that a crash or a second
        # process (another DDP rank) never sees a half-written cache.
        tmp = corpus / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _tokenise_into(tmp, docs, tok, "stdlib", extra, val=val_names([r for r, _ in docs]),
                       total_bytes=sum(len(t.encode()) for _, t in docs), progress=progress)
        if not _cached(folder, tok.name):  # else another process finished first
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete or outdated cache
        try:
            os.rename(tmp, folder)
        except OSError:  # the folder is there and complete: ours is a duplicate
            shutil.rmtree(tmp, ignore_errors=True)
    with atomic_write(keyfile) as f:
        f.write(json.dumps({"source_hash": source_hash, "root": str(root)}).encode())
    return folder


# ---------------------------------------------------------------- user text


def _single_file(src: Path, val_share: float) -> tuple[list[Doc], set[str], dict]:
    """One file has no files to split by: its last `val_share` of lines (at least one) becomes
    the document "val", the rest "train". Read whole, so meant for modest files."""
    reader = DocReader([(src.name, src, 0, 0)])
    docs = list(reader)
    if not docs:
        raise DataError(f"{src}: not a UTF-8 text file")
    lines = docs[0][1].splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * val_share))
    if cut < 1:
        raise DataError(f"{src}: too short to split into train and validation ({len(lines)} "
                        "lines); give it more text or several files")
    extra = {"source_hash": reader.source_hash, "skipped": [],
             "split_rule": f"the last {val_share:g} of the lines (at least one) is validation"}
    return [("train", "".join(lines[:cut])), ("val", "".join(lines[cut:]))], {"val"}, extra


def prepare_folder(src: Path, out: Path, tok: Tokenizer, *, name: str | None = None,
                   shard_tokens: int = SHARD_TOKENS, val_share: float = VAL_SHARE,
                   progress: bool = True) -> dict:
    """Tokenise a text file, or every UTF-8 file in a folder (one document each, sorted and
    streamed), into `out/<name>_{train,val}_NNNNNN.bin` plus `manifest.json`."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise DataError(f"{src}: no such file or folder")
    if not 0 < val_share <= 0.5:
        raise DataError(f"--val-share {val_share}: must lie in (0, 0.5]")
    if out.exists() and any(out.glob("*.bin")):
        raise DataError(f"{out}: already holds .bin shards; choose an empty --out folder")
    listing = list_files(src) if src.is_dir() else []
    if len(listing) >= 2:
        docs, total = DocReader(listing), sum(size for _, _, size, _ in listing)
        val = val_names([rel for rel, *_ in listing], val_share)
        extra = {"split_rule": _split_rule(val_share)}
    elif src.is_dir() and not listing:
        raise DataError(f"{src}: no files to prepare")
    else:
        docs, val, extra = _single_file(listing[0][1] if listing else src, val_share)
        total = sum(len(t.encode()) for _, t in docs)
    extra["source"] = str(src)
    return _tokenise_into(out, docs, tok, name or src.stem, extra, val=val, total_bytes=total,
                          shard_tokens=shard_tokens, progress=progress)
