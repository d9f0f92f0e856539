"""Tokenizers: GPT-2 ids as OpenAI's, bytes round trips, and an offline installer that refuses
anything but the right file. GPT-2 tests skip (with the install command) where the ranks are not
installed; `python -m search.tokenizer install` provides them."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from search import tokenizer as tk
from search.tokenizer import TokenizerMissing, get_tokenizer

SAMPLE = ("Hello world! naïve café, 日本語のテキスト 🙂\n\n    def f(x):\n\treturn x ** 2  # ok\n"
          "<|endoftext|> is ordinary text here.\n")


@pytest.fixture(scope="module")
def gpt2():
    try:
        return get_tokenizer("gpt2")
    except TokenizerMissing as e:
        pytest.skip(f"GPT-2 ranks not installed ({e})")


@pytest.fixture(scope="module")
def real_ranks(gpt2) -> Path:
    """The installed rank file (found before any test moves the home folder)."""
    return tk.find_rank_file()


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """Point the playground home and tiktoken's cache at empty folders."""
    monkeypatch.setenv("LM_PLAYGROUND_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    return tmp_path


def test_gpt2_known_ids_and_round_trip(gpt2):
    assert (gpt2.name, gpt2.vocab_size, gpt2.eot) == ("gpt2", 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]
    ids = gpt2.encode(SAMPLE)
    assert gpt2.decode(ids) == SAMPLE
    assert gpt2.eot not in ids  # ordinary text: the special string is just characters
    assert [a.tolist() for a in gpt2.encode_batch(["Hello world", SAMPLE])] == [[15496, 995], ids]


def test_gpt2_token_bytes_count_utf8(gpt2):
    assert gpt2.token_bytes.shape == (50257,) and gpt2.token_bytes[gpt2.eot] == 0
    assert gpt2.token_bytes[:gpt2.eot].min() >= 1
    ids = gpt2.encode(SAMPLE)
    assert int(gpt2.token_bytes[ids].sum()) == len(SAMPLE.encode("utf-8"))


def test_bytes_round_trip_non_ascii():
    tok = get_tokenizer("bytes")
    assert (tok.vocab_size, tok.eot, tok.token_bytes.shape) == (260, 256, (260,))
    ids = tok.encode(SAMPLE)
    assert max(ids) < 256 and len(ids) == len(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert tok.decode([256] + ids + [257, 259]) == SAMPLE  # specials carry no text
    assert int(tok.token_bytes[ids + [256]].sum()) == len(SAMPLE.encode("utf-8"))
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut character is replaced, never an error
    assert [a.tolist() for a in tok.encode_batch([SAMPLE])] == [ids]


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="gpt2, bytes"):
        get_tokenizer("llama3")


def test_missing_ranks_say_how_to_install(empty_home):
    with pytest.raises(TokenizerMissing) as e:
        get_tokenizer("gpt2")
    msg = str(e.value)
    assert "python -m search.tokenizer install" in msg and "--from FILE" in msg
    assert str(empty_home / "home" / "tokenizers" / "gpt2.tiktoken") in msg
    assert hashlib.sha1(tk.R50K_URL.encode()).hexdigest() in msg  # tiktoken's cache name


def test_corrupt_ranks_are_not_used(empty_home):
    bad = empty_home / "home" / "tokenizers" / "gpt2.tiktoken"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(TokenizerMissing, match="wrong sha256"):
        get_tokenizer("gpt2")


def test_installer_refuses_wrong_hash(empty_home, capsys):
    fake = empty_home / "fake.tiktoken"
    fake.write_bytes(b"IQ== 0\nIg== 1\n")
    assert tk.main(["install", "--from", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and hashlib.sha256(fake.read_bytes()).hexdigest() in err
    assert not any(p.exists() for p in tk.rank_file_locations())


def test_install_from_file_is_offline_and_idempotent(real_ranks, empty_home, capsys):
    real = real_ranks
    assert tk.main(["install", "--from", str(real)]) == 0
    home, cache = tk.rank_file_locations()
    assert home.read_bytes() == cache.read_bytes() == real.read_bytes()
    import tiktoken.load

    # tiktoken finds our copy under its own cache name: no download is attempted
    ranks = tiktoken.load.load_tiktoken_bpe(tk.R50K_URL, expected_hash=tk.R50K_SHA256)
    assert ranks == tk.parse_ranks(real.read_bytes())
    capsys.readouterr()
    assert tk.install() == []
    assert "already installed" in capsys.readouterr().out


def _tar(path: Path, name: str, data: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_sdist_member_is_read_without_extracting(real_ranks, tmp_path):
    data = real_ranks.read_bytes()
    ok = _tar(tmp_path / "openai_whisper-1.tar.gz", "openai_whisper-1/whisper/assets/gpt2.tiktoken",
              data)
    assert tk.ranks_from_sdist(ok) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openai_whisper-1.tar.gz"]


def test_sdist_path_tricks_are_refused(tmp_path):
    evil = _tar(tmp_path / "evil.tar.gz", "../../whisper/assets/gpt2.tiktoken", b"x")
    with pytest.raises(TokenizerMissing, match="suspicious"):
        tk.ranks_from_sdist(evil)
    empty = _tar(tmp_path / "other.tar.gz", "pkg/README", b"x")
    with pytest.raises(TokenizerMissing, match="openai-whisper sdist"):
        tk.ranks_from_sdist(empty)
