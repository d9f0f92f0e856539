"""Tokenizers: GPT-2 (tiktoken, offline) and raw UTF-8 bytes, behind one small interface.

`get_tokenizer("gpt2" | "bytes")` returns an object with `name`, `vocab_size`, `eot`,
`encode`, `encode_batch`, `decode` and `token_bytes` (UTF-8 bytes per id, 0 for special ids,
which is what bits per byte is computed from).

The GPT-2 ranks are never fetched at run time. `python -m search.tokenizer install [--from FILE]`
takes them from the `openai-whisper` source distribution on PyPI (`whisper/assets/gpt2.tiktoken`
is byte-identical to tiktoken's `r50k_base.tiktoken`, whose ids equal `gpt2`'s), checks the
SHA-256 and writes the file to `$LM_PLAYGROUND_HOME/tokenizers/gpt2.tiktoken` and into
tiktoken's own cache, so that `tiktoken.get_encoding("r50k_base")` works offline too.
"""
from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The GPT-2 / r50k_base pre-tokenisation pattern (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
WHISPER_PIN = "20250625"  # an openai-whisper release whose sdist carries the file (checked)
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
MAX_RANKS_BYTES = 4 << 20  # the real file is 835,554 bytes; refuse anything absurd
INSTALL_HINT = ("run `python -m search.tokenizer install` (downloads the openai-whisper sdist "
                "from PyPI), or `python -m search.tokenizer install --from FILE` with a copy of "
                "gpt2.tiktoken / r50k_base.tiktoken or an openai-whisper .tar.gz")


class TokenizerMissing(FileNotFoundError):
    """The GPT-2 ranks are not on this machine (or are corrupt); the message says how to fix it."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot: int
    token_bytes: np.ndarray

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def decode(self, ids) -> str: ...


def playground_home() -> Path:
    """`$LM_PLAYGROUND_HOME`, default `~/.cache/lm-playground`: tokenizers and cached corpora."""
    env = os.environ.get("LM_PLAYGROUND_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lm-playground"


def tiktoken_cache_dir() -> Path | None:
    """The directory tiktoken 0.14 itself reads its cache from; None when caching is disabled.

    Mirrors `tiktoken.load.read_file_cached`: TIKTOKEN_CACHE_DIR, then DATA_GYM_CACHE_DIR, then
    `<tempdir>/data-gym-cache` (an empty string disables the cache).
    """
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def rank_file_locations() -> list[Path]:
    """Where the GPT-2 ranks are looked for, in order."""
    places = [playground_home() / "tokenizers" / "gpt2.tiktoken"]
    cache = tiktoken_cache_dir()
    if cache is not None:
        places.append(cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    return places


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_rank_file() -> Path:
    """The first location holding verified ranks; else TokenizerMissing naming what was tried."""
    tried = []
    for path in rank_file_locations():
        if not path.is_file():
            tried.append(f"{path} (absent)")
        elif _sha256(path.read_bytes()) != R50K_SHA256:
            tried.append(f"{path} (wrong sha256: corrupt or a different file)")
        else:
            return path
    raise TokenizerMissing("GPT-2 tokenizer ranks not found; looked in " + "; ".join(tried)
                           + f". To provide them, {INSTALL_HINT}.")


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse the `.tiktoken` format: one `base64(token) rank` pair per line."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken, built from a local, hash-checked rank file."""

    name = "gpt2"
    vocab_size = 50257
    eot = 50256

    def __init__(self, rank_file: Path):
        import tiktoken

        data = rank_file.read_bytes()
        if _sha256(data) != R50K_SHA256:
            raise TokenizerMissing(f"{rank_file} has the wrong sha256; {INSTALL_HINT}.")
        # Parsed here rather than by tiktoken.load.load_tiktoken_bpe(path): that function copies
        # any local file it reads into tiktoken's cache under sha1(path), a stray side effect.
        self.encoding = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=parse_ranks(data),
            special_tokens={"<|endoftext|>": self.eot}, explicit_n_vocab=self.vocab_size)
        lengths = [len(self.encoding.decode_single_token_bytes(i)) for i in range(self.eot)]
        self.token_bytes = np.array(lengths + [0], dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        """Ordinary text: `<|endoftext|>` in the text is encoded as plain characters."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many texts on all cores (tiktoken releases the GIL)."""
        out = self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)
        return [np.array(ids, dtype=np.uint32) for ids in out]

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are bytes, 256 is EOT/BOS, 257..259 reserved (BLT's 256 + 4)."""

    name = "bytes"
    vocab_size = 260
    eot = 256

    def __init__(self):
        self.token_bytes = np.array([1] * 256 + [0] * 4, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]

    def decode(self, ids) -> str:
        """Special ids are dropped; invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


TOKENIZERS = ("gpt2", "bytes")


@functools.lru_cache(maxsize=4)
def _gpt2(rank_file: Path) -> GPT2Tokenizer:
    return GPT2Tokenizer(rank_file)


def get_tokenizer(name: str) -> Tokenizer:
    """`"gpt2"` (needs the installed ranks) or `"bytes"`."""
    if name == "gpt2":
        return _gpt2(find_rank_file())  # located every call, so a changed home is honoured
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


# ---------------------------------------------------------------- install


def ranks_from_sdist(archive: Path) -> bytes:
    """Read `whisper/assets/gpt2.tiktoken` out of an openai-whisper sdist without extracting."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.name.endswith(WHISPER_MEMBER):
                    continue
                # Nothing is written to disk, but refuse odd members rather than trust them.
                if (not member.isfile() or member.name.startswith("/") or ".." in parts
                        or member.size > MAX_RANKS_BYTES):
                    raise TokenizerMissing(f"{archive}: refusing suspicious member {member.name!r}")
                return tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise TokenizerMissing(f"{archive} is not a readable .tar.gz ({e})") from None
    raise TokenizerMissing(f"{archive} holds no {WHISPER_MEMBER}; is it an openai-whisper sdist?")


def download_ranks() -> bytes:
    """pip-download the pinned openai-whisper sdist to a temporary folder and read the ranks."""
    with tempfile.TemporaryDirectory(prefix="lm-playground-whisper-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"openai-whisper=={WHISPER_PIN}", "-d", tmp]
        print("running:", " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise TokenizerMissing(f"pip download failed (exit {done.returncode}):\n"
                                   f"{done.stderr[-2000:]}\nOffline? Use --from FILE instead.")
        archives = sorted(Path(tmp).glob("openai_whisper-*.tar.gz")) + sorted(
            Path(tmp).glob("openai-whisper-*.tar.gz"))
        if not archives:
            raise TokenizerMissing(f"pip download left no openai-whisper .tar.gz in {tmp}")
        return ranks_from_sdist(archives[0])


def read_source(path: Path) -> bytes:
    """The ranks from FILE: the rank file itself, or an sdist holding it."""
    if not path.is_file():
        raise TokenizerMissing(f"{path}: no such file")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return ranks_from_sdist(path)
    if path.stat().st_size > MAX_RANKS_BYTES:
        raise TokenizerMissing(f"{path} is {path.stat().st_size:,} bytes: not a GPT-2 rank file")
    return path.read_bytes()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and os.replace, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def install(source: Path | None = None) -> list[Path]:
    """Install the verified ranks in every location; returns the paths written (may be none)."""
    targets = rank_file_locations()
    valid = [p for p in targets if p.is_file() and _sha256(p.read_bytes()) == R50K_SHA256]
    if len(valid) == len(targets) and source is None:
        print("already installed, sha256 verified:\n  " + "\n  ".join(map(str, targets)))
        return []
    if source is not None:
        data, origin = read_source(source), str(source)
    elif valid:
        data, origin = valid[0].read_bytes(), str(valid[0])
    else:
        data, origin = download_ranks(), f"openai-whisper=={WHISPER_PIN} sdist"
    digest = _sha256(data)
    if digest != R50K_SHA256:
        raise TokenizerMissing(f"refusing {origin}: sha256 {digest} is not the GPT-2 / r50k_base "
                               f"ranks ({R50K_SHA256}); nothing was installed")
    written = []
    for path in targets:
        if path in valid:
            continue
        write_atomic(path, data)
        written.append(path)
    print(f"installed GPT-2 ranks from {origin} (sha256 verified):")
    for path in targets:
        print(f"  {path}" + ("" if path in written else "  (already there)"))
    if tiktoken_cache_dir() is None:
        print("  tiktoken's cache is disabled (TIKTOKEN_CACHE_DIR is empty); skipped it")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("install", help="install the GPT-2 ranks for offline use")
    p.add_argument("--from", dest="source", type=Path, default=None,
                   help="a gpt2.tiktoken / r50k_base.tiktoken file or an openai-whisper sdist")
    args = parser.parse_args(argv)
    try:
        install(args.source)
    except TokenizerMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
