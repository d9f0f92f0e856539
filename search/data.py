"""Token datasets: the built-in corpus, prepared shard folders, and `python -m search.data`.

`open_dataset(spec, tokenizer)` turns a spec into a `Dataset` (train and val token arrays,
memory-mapped, plus the manifest facts):
- `None` or `"builtin"`: the Python standard library's `.py` sources, tokenised once and cached;
- a folder of llm.c `.bin` shards (or build-nanogpt `.npy` shards) whose names contain `train` /
  `val`, e.g. `fineweb_train_000001.bin`; its `manifest.json`, when present, is authoritative;
- `raw_u16:DIR`: nanoGPT's headerless `DIR/train.bin` and `DIR/val.bin`.

Corpora we tokenise ourselves (the built-in one, `prepare`) are split by document with a fixed
rule and get EOT prepended to every document; see `search.corpus`. File formats live in
`search.shards`, batching and the bits-per-byte validation span in `search.loader`.

CLI: `python -m search.data prepare TEXT_OR_DIR --out DIR [--tokenizer gpt2|bytes]
[--shard-tokens N] [--val-share 0.02] [--name NAME]` and `python -m search.data info [SPEC]`.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search.corpus import (SHARD_TOKENS, VAL_SHARE, builtin_folder, is_val,  # noqa: F401
                           prepare_folder, val_names)
from search.loader import Loader, ValBatches, bits_per_byte, val_batches, val_span  # noqa: F401
from search.shards import (MANIFEST, DataError, files_hash, read_manifest, read_npy,  # noqa: F401
                           read_raw_u16, read_shard, read_tokens, write_shard)
from search.tokenizer import TOKENIZERS, ByteTokenizer, GPT2Tokenizer, get_tokenizer

__all__ = ["Dataset", "DataError", "open_dataset", "builtin_dataset", "prepare", "info_table",
           "Loader", "ValBatches", "val_batches", "val_span", "bits_per_byte", "is_val",
           "val_names", "read_shard", "write_shard", "read_npy", "read_raw_u16", "read_tokens"]


@dataclass
class Dataset:
    """Train and validation token arrays (memory-mapped) with what is known about them."""

    name: str
    tokenizer: str
    train: list[np.ndarray]
    val: list[np.ndarray]
    content_hash: str  # builtin: sha256 of the source text; otherwise of the shard files
    eot_placement: str = "prepend"  # "prepend" (llm.c, build-nanogpt) or "append" (nanoGPT)
    files: dict[str, list[Path]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return sum(len(a) for a in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(len(a) for a in self.val)


# ---------------------------------------------------------------- opening


def open_dataset(spec: str | None, tokenizer_name: str | None = "gpt2") -> Dataset:
    """`None`/`"builtin"`, a folder of shards, or `raw_u16:DIR` (see the module docstring)."""
    if spec in (None, "builtin"):
        return builtin_dataset(tokenizer_name or "gpt2")
    if spec.startswith("raw_u16:"):
        return _open_raw_u16(Path(spec[len("raw_u16:"):]), tokenizer_name or "gpt2")
    folder = Path(spec)
    if not folder.is_dir():
        raise DataError(f"{spec}: no such folder; a dataset is 'builtin', a folder of token "
                        "shards, or raw_u16:DIR")
    manifest = read_manifest(folder)
    if manifest is not None:
        return _open_manifest(folder, manifest, tokenizer_name)
    return _open_shard_folder(folder, tokenizer_name or "gpt2")


def _open_manifest(folder: Path, manifest: dict, tokenizer_name: str | None) -> Dataset:
    tok = manifest["tokenizer"]
    if tokenizer_name is not None and tokenizer_name != tok:
        raise DataError(f"{folder / MANIFEST}: these tokens come from tokenizer '{tok}', not "
                        f"'{tokenizer_name}'; use --tokenizer {tok} or prepare the data again")
    files = {s: [folder / e["file"] for e in manifest[s]] for s in ("train", "val")}
    arrays = {s: [read_tokens(p) for p in files[s]] for s in files}
    for split, entries in (("train", manifest["train"]), ("val", manifest["val"])):
        for entry, arr, path in zip(entries, arrays[split], files[split]):
            if len(arr) != entry["tokens"]:
                raise DataError(f"{path}: holds {len(arr):,} tokens but {MANIFEST} says "
                                f"{entry['tokens']:,}; prepare the data again")
    return Dataset(manifest.get("name", folder.name), tok, arrays["train"], arrays["val"],
                   manifest["content_hash"],
                   manifest.get("eot_placement", "prepend"), files, manifest)


def _split_files(folder: Path, paths: list[Path]) -> dict[str, list[Path]]:
    split = {"train": [p for p in paths if "train" in p.name and "val" not in p.name],
             "val": [p for p in paths if "val" in p.name and "train" not in p.name]}
    for name, found in split.items():
        if not found:
            raise DataError(f"{folder}: no {name} shard (file names must contain '{name}', like "
                            f"fineweb_{name}_000000.bin)")
    return split


def _check_vocab(paths: list[Path], arrays: list[np.ndarray], tokenizer_name: str) -> None:
    """Catch a wrong --tokenizer early: ids beyond the vocabulary crash embeddings on GPU."""
    vocab = {"gpt2": GPT2Tokenizer.vocab_size, "bytes": ByteTokenizer.vocab_size}[tokenizer_name]
    for path, arr in zip(paths, arrays):
        head = np.asarray(arr[:1 << 20])
        if head.size and int(head.max()) >= vocab:
            raise DataError(f"{path}: holds token id {int(head.max())}, beyond tokenizer "
                            f"'{tokenizer_name}' (vocab {vocab}); pass the right --tokenizer")


def _foreign(name: str, tok: str, files: dict, fmt: str, placement: str) -> Dataset:
    if tok not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tok!r}; one of {', '.join(TOKENIZERS)}")
    arrays = {s: [read_tokens(p, fmt) for p in files[s]] for s in ("train", "val")}
    for s in arrays:
        _check_vocab(files[s], arrays[s], tok)
    return Dataset(name, tok, arrays["train"], arrays["val"],
                   files_hash(files["train"] + files["val"]), placement, files)


def _open_shard_folder(folder: Path, tok: str) -> Dataset:
    for pattern, fmt in (("*.bin", "llmc"), ("*.npy", "npy")):
        paths = sorted(folder.glob(pattern))
        if paths:
            return _foreign(folder.name, tok, _split_files(folder, paths), fmt, "prepend")
    raise DataError(f"{folder}: no manifest.json, *.bin or *.npy token shards. Make some with "
                    "`python -m search.data prepare TEXT_OR_DIR --out DIR`")


def _open_raw_u16(folder: Path, tok: str) -> Dataset:
    files = {"train": [folder / "train.bin"], "val": [folder / "val.bin"]}
    return _foreign(folder.name, tok, files, "raw_u16", "append")  # nanoGPT appends EOT


# ---------------------------------------------------------------- built-in corpus and prepare


def builtin_dataset(tokenizer_name: str = "gpt2", *, home: Path | None = None,
                    progress: bool = True) -> Dataset:
    """The standard library's sources, tokenised once and cached (see `search.corpus`).

    `home` overrides `$LM_PLAYGROUND_HOME` for the corpus cache (the GPT-2 ranks are still looked
    up in the usual places). `content_hash` is the sha256 of the source text.
    """
    folder = builtin_folder(get_tokenizer(tokenizer_name), home=home, progress=progress)
    ds = _open_manifest(folder, read_manifest(folder), tokenizer_name)
    ds.name, ds.content_hash = "builtin", ds.manifest["source_hash"]
    return ds


def bytes_per_token(ds: Dataset, tokenizer, sample: int = 1 << 24) -> float:
    """Mean UTF-8 bytes per training token over the first `sample` tokens of the train split (an
    EOT counts 0): what turns a byte count into tokens for each tokenizer (`--trial-bytes`).
    Remembered per data set and tokenizer: a study's trials do not count again."""
    key = (ds.content_hash, tokenizer.name, sample)
    if key in _BYTES_PER_TOKEN:
        return _BYTES_PER_TOKEN[key]
    n = b = 0
    for arr in ds.train:
        part = np.asarray(arr[:sample - n])
        b += int(tokenizer.token_bytes[part].sum())
        n += len(part)
        if n >= sample:
            break
    if b == 0:
        raise DataError(f"dataset {ds.name}: no bytes in its training tokens")
    _BYTES_PER_TOKEN[key] = b / n
    return b / n


_BYTES_PER_TOKEN: dict = {}


def prepare(src: str | Path, out: str | Path, tokenizer_name: str = "gpt2", *,
            shard_tokens: int = SHARD_TOKENS, val_share: float = VAL_SHARE,
            name: str | None = None, progress: bool = True) -> Dataset:
    """Tokenise a text file or a folder of text files into shards + manifest.json in `out`."""
    prepare_folder(Path(src), Path(out), get_tokenizer(tokenizer_name), name=name,
                   shard_tokens=shard_tokens, val_share=val_share, progress=progress)
    return open_dataset(str(out), tokenizer_name)


# ---------------------------------------------------------------- CLI


def info_table(ds: Dataset) -> str:
    """A plain-text table of a dataset's files, token counts and dtypes, and its hash."""
    rows = [("split", "file", "tokens", "dtype")]
    for split in ("train", "val"):
        paths = ds.files.get(split) or [None] * len(getattr(ds, split))
        for path, arr in zip(paths, getattr(ds, split)):
            rows.append((split, str(path), f"{len(arr):,}", arr.dtype.name))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i == 2 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    head = [f"dataset        {ds.name}", f"tokenizer      {ds.tokenizer}",
            f"EOT placement  {ds.eot_placement}", f"content hash   {ds.content_hash}",
            f"tokens         train {ds.train_tokens:,}, val {ds.val_tokens:,}"]
    return "\n".join(head + [""] + lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.data",
                                     description="Prepare and inspect token datasets.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare", help="tokenise a text file or folder into shards")
    p.add_argument("src", metavar="TEXT_OR_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS)
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, metavar="N")
    p.add_argument("--val-share", type=float, default=VAL_SHARE)
    p.add_argument("--name", default=None, help="shard name prefix (default: the source's name)")
    i = sub.add_parser("info", help="list a dataset's files, tokens, dtype and hash")
    i.add_argument("spec", nargs="?", default="builtin", metavar="SPEC")
    i.add_argument("--tokenizer", default=None, choices=TOKENIZERS,
                   help="the tokenizer of shards without a manifest (default gpt2)")
    args = parser.parse_args(argv)
    try:
        if args.verb == "prepare":
            t0 = time.perf_counter()
            ds = prepare(args.src, args.out, args.tokenizer, shard_tokens=args.shard_tokens,
                         val_share=args.val_share, name=args.name)
            print(f"prepared in {time.perf_counter() - t0:.1f} s\n")
        else:
            ds = open_dataset(args.spec, args.tokenizer)
        print(info_table(ds))
    except (DataError, FileNotFoundError) as e:  # TokenizerMissing is a FileNotFoundError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
