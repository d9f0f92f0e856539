"""Token data: shard formats, prepare, the built-in corpus, the loader and bits per byte."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from search import corpus, data
from search.data import (DataError, Dataset, Loader, bits_per_byte, builtin_dataset,
                         open_dataset, read_shard, val_batches, val_span, write_shard)
from search.tokenizer import TokenizerMissing, get_tokenizer

TEXTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n" * 20,
    "b/notes.md": "# Notes\n\nnaïve café — 日本語 🙂\n" * 15,
    "b/code.py": "def f(x):\n    return x * 2\n" * 30,
    "c.txt": "",
    "d.txt": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 12,
    "e.txt": "one\ntwo\nthree\n",
}


def tokenizer_or_skip(name: str):
    try:
        return get_tokenizer(name)
    except TokenizerMissing as e:
        pytest.skip(f"GPT-2 ranks not installed ({e})")


def hand_shard(path: Path, tokens, magic=20240520, version=1, count=None, dtype=np.uint16):
    """An llm.c shard written by hand: 256 int32 header, then the tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype=dtype).tofile(f)
    return path


# ---------------------------------------------------------------- shard files


@pytest.mark.parametrize("top, dtype, magic", [(50256, np.uint16, 20240520),
                                               (128255, np.uint32, 20240801)])
def test_shard_round_trip(tmp_path, top, dtype, magic):
    tokens = np.random.default_rng(0).integers(0, top + 1, 5000)
    tokens[7] = top
    path = write_shard(tmp_path / "x_train_000000.bin", tokens)
    got = read_shard(path)
    assert got.dtype == dtype and isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, tokens)
    assert np.fromfile(path, np.int32, 3).tolist() == [magic, 1 if magic == 20240520 else 7, 5000]
    assert [p.name for p in tmp_path.iterdir()] == ["x_train_000000.bin"]  # no temporary left


def test_hand_built_llmc_shard_reads(tmp_path):
    tokens = np.arange(1000) % 50257
    np.testing.assert_array_equal(read_shard(hand_shard(tmp_path / "s.bin", tokens)), tokens)
    wide = np.arange(70000, 70100)
    path = hand_shard(tmp_path / "w.bin", wide, 20240801, 7, dtype=np.uint32)
    np.testing.assert_array_equal(read_shard(path), wide)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: hand_shard(p, range(10), magic=12345), "unknown magic 12345"),
    (lambda p: hand_shard(p, range(10), version=3), "version 1, but the header says 3"),
    (lambda p: hand_shard(p, range(999), count=1000),
     "header says 1,000 tokens but the file holds 999"),
    (lambda p: hand_shard(p, range(10), count=-5), "header says -5 tokens"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: p.write_bytes(b"\0" * 100), "shorter than the 1024-byte llm.c header"),
    (lambda p: p.write_bytes(np.arange(1000, dtype=np.uint16).tobytes()), "raw_u16:DIR"),
])
def test_bad_shards_raise_data_error_naming_the_file(tmp_path, make, fragment):
    path = tmp_path / "broken_train_000000.bin"
    make(path)
    with pytest.raises(DataError) as e:
        read_shard(path)
    assert str(path) in str(e.value) and fragment in str(e.value)


def test_missing_shard(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_shard(tmp_path / "nope.bin")


def test_npy_and_raw_u16_folders(tmp_path):
    npy, raw = tmp_path / "npy", tmp_path / "raw"
    npy.mkdir(), raw.mkdir()
    train, val = np.arange(3000, dtype=np.uint16), np.arange(500, dtype=np.uint16) + 7
    np.save(npy / "edufineweb_train_000001.npy", train)
    np.save(npy / "edufineweb_val_000000.npy", val)
    ds = open_dataset(str(npy), "gpt2")
    np.testing.assert_array_equal(ds.train[0], train)
    np.testing.assert_array_equal(ds.val[0], val)
    assert ds.eot_placement == "prepend" and len(ds.content_hash) == 64
    train.tofile(raw / "train.bin"), val.tofile(raw / "val.bin")
    ds = open_dataset(f"raw_u16:{raw}", "gpt2")
    np.testing.assert_array_equal(ds.train[0], train)
    assert ds.eot_placement == "append"  # nanoGPT appends EOT
    with pytest.raises(DataError, match="raw_u16:DIR"):  # .bin alone means llm.c
        open_dataset(str(raw), "gpt2")


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        open_dataset(str(tmp_path / "absent"), "gpt2")
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(100))
    with pytest.raises(DataError, match="no val shard"):
        open_dataset(str(tmp_path), "gpt2")
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(300))
    with pytest.raises(DataError, match="beyond tokenizer 'bytes'"):
        open_dataset(str(tmp_path), "bytes")
    assert open_dataset(str(tmp_path), "gpt2").val_tokens == 300


# ---------------------------------------------------------------- prepare


@pytest.fixture
def text_folder(tmp_path) -> Path:
    src = tmp_path / "texts"
    for rel, text in TEXTS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    (src / "image.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x81]) * 10)  # not UTF-8: skipped
    return src


def documents(ds: Dataset, split: str, tok) -> list[str]:
    """Decode a split back into documents, cutting before each (prepended) EOT."""
    stream = np.concatenate(getattr(ds, split)).astype(np.int64)
    starts = np.flatnonzero(stream == tok.eot)
    assert starts[0] == 0  # every document opens with EOT
    return [tok.decode(stream[a + 1:b]) for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


@pytest.mark.parametrize("tok_name", ["bytes", "gpt2"])
def test_prepare_cli_round_trips(text_folder, tmp_path, tok_name, capsys):
    tok = tokenizer_or_skip(tok_name)
    out = tmp_path / "shards"
    rc = data.main(["prepare", str(text_folder), "--out", str(out), "--tokenizer", tok_name,
                    "--shard-tokens", "100", "--val-share", "0.2", "--name", "demo"])
    assert rc == 0 and "demo_train_000000.bin" in capsys.readouterr().out
    ds = open_dataset(str(out), tok_name)
    assert len(ds.train) > 2 and ds.files["train"][1].name == "demo_train_000001.bin"
    val = corpus.val_names(sorted(TEXTS), 0.2)
    assert ds.manifest["val_documents"] == sorted(val) and ds.manifest["skipped"] == ["image.bin"]
    for split, names in (("train", [n for n in sorted(TEXTS) if n not in val]),
                         ("val", sorted(val))):
        assert documents(ds, split, tok) == [TEXTS[n] for n in names]
    assert data.main(["info", str(out)]) == 0
    assert "demo_val_000000.bin" in capsys.readouterr().out


def test_prepare_single_file_splits_by_lines(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("".join(f"line {i}\n" for i in range(100)))
    ds = data.prepare(src, tmp_path / "out", "bytes", val_share=0.05, progress=False)
    tok = get_tokenizer("bytes")
    assert documents(ds, "val", tok) == ["".join(f"line {i}\n" for i in range(95, 100))]
    assert documents(ds, "train", tok)[0].endswith("line 94\n")


def test_prepare_refuses_a_used_folder(text_folder, tmp_path):
    data.prepare(text_folder, tmp_path / "out", "bytes", progress=False)
    with pytest.raises(DataError, match="already holds"):
        data.prepare(text_folder, tmp_path / "out", "bytes", progress=False)


def test_split_rule_keeps_both_sides():
    assert corpus.val_names(["only_a", "only_b"], 0.02) in ({"only_a"}, {"only_b"})
    names = [f"f{i}.py" for i in range(20000)]
    share = len(corpus.val_names(names, 0.02)) / len(names)
    assert 0.017 < share < 0.023


# ---------------------------------------------------------------- the built-in corpus


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def test_builtin_corpus_is_deterministic_and_cached(home):
    first = builtin_dataset("bytes", home=home, progress=False)
    t0 = time.perf_counter()
    again = builtin_dataset("bytes", home=home, progress=False)
    hit = time.perf_counter() - t0
    assert hit < 1.5, f"cache hit took {hit:.2f} s"
    assert again.content_hash == first.content_hash and len(first.content_hash) == 64
    assert again.files == first.files
    assert first.files["val"][0].parent.name == f"{first.content_hash[:16]}-bytes"
    np.testing.assert_array_equal(again.val[0], first.val[0])


def test_builtin_split_is_by_file(home):
    ds = builtin_dataset("bytes", home=home, progress=False)
    m = ds.manifest
    root, listing = corpus.stdlib_listing()
    kept = [rel for rel, *_ in listing if rel not in m["skipped"]]
    assert m["val_documents"] == [rel for rel in kept if corpus.is_val(rel)]
    assert m["documents"] == {"train": len(kept) - len(m["val_documents"]),
                              "val": len(m["val_documents"])}
    assert not any("site-packages" in rel for rel in kept)
    assert 0.01 < m["documents"]["val"] / len(kept) < 0.04
    assert ds.train_tokens > 10_000_000 and ds.val_tokens > 100_000
    assert int((ds.val[0] == 256).sum()) == m["documents"]["val"]  # one EOT per document
    assert ds.val[0][0] == 256 and ds.train[0][0] == 256
    x, y = Loader(ds.train, 4, 64, seed=0).next()  # straight from the memory map
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) <= 256


# ---------------------------------------------------------------- the loader


def coded_shards() -> list[np.ndarray]:
    """Tokens that name their own shard and position, so windows can be traced back."""
    return [(s * 100_000 + np.arange(n)).astype(np.uint32)
            for s, n in enumerate((1000, 537, 2049))]


def take(loader: Loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_loader_windows(tmp_path):
    loader = Loader(coded_shards(), 4, 16, seed=1)
    assert loader.n_windows == 999 // 16 + 536 // 16 + 2048 // 16
    seen = []
    for x, y in take(loader, len(loader)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.equal(x // 100_000, y // 100_000)  # one shard per window: no straddling
        assert bool((x % 16 == 0)[:, 0].all())  # windows start at the stride
        seen += x[:, 0].tolist()
    assert len(seen) == len(set(seen))  # an epoch visits each window at most once


def test_loader_is_deterministic_per_seed():
    a, b, c = (Loader(coded_shards(), 4, 16, seed=s) for s in (7, 7, 8))
    for (xa, ya), (xb, yb), (xc, _) in zip(take(a, 50), take(b, 50), take(c, 50)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(take(a, 5), take(c, 5)))


@pytest.mark.parametrize("stop", [3, 12, 13])
def test_loader_resumes_exactly(stop):
    ref = Loader(coded_shards(), 4, 64, seed=3)
    assert len(ref) == 13
    take(ref, stop)
    state = ref.state_dict()
    want = take(ref, 20)  # runs over the epoch boundary
    resumed = Loader(coded_shards(), 4, 64, seed=3)
    resumed.load_state_dict(state)
    for (xw, yw), (xr, yr) in zip(want, take(resumed, 20)):
        assert torch.equal(xw, xr) and torch.equal(yw, yr)
    with pytest.raises(ValueError, match="batch_size"):
        Loader(coded_shards(), 8, 64, seed=3).load_state_dict(state)


def test_loader_ranks_split_the_global_batch():
    world, b = 3, 2
    whole = Loader(coded_shards(), b * world, 16, seed=5)
    ranks = [Loader(coded_shards(), b, 16, seed=5, rank=r, world=world) for r in range(world)]
    for _ in range(len(whole) + 2):
        x, _ = next(whole)
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
        assert len({tuple(row.tolist()) for p in parts for row in p}) == b * world


def test_loader_too_little_data():
    with pytest.raises(DataError, match="fewer than one global batch"):
        Loader([np.arange(100)], 8, 64)


# ---------------------------------------------------------------- validation in bits per byte


@pytest.fixture(scope="module")
def builtin_pair(home):
    gpt2 = tokenizer_or_skip("gpt2")
    return {"gpt2": (builtin_dataset("gpt2", home=home, progress=False), gpt2),
            "bytes": (builtin_dataset("bytes", home=home, progress=False),
                      get_tokenizer("bytes"))}


def test_val_span_is_the_same_text_for_every_tokenizer(builtin_pair):
    spans = {n: val_span(ds, tok, 200_000) for n, (ds, tok) in builtin_pair.items()}
    assert spans["gpt2"].n_docs == spans["bytes"].n_docs > 1
    assert spans["gpt2"].span_bytes == spans["bytes"].span_bytes <= 200_000
    texts = {n: builtin_pair[n][1].decode(s.tokens[s.tokens != builtin_pair[n][1].eot])
             for n, s in spans.items()}
    assert texts["gpt2"] == texts["bytes"]
    assert len(texts["bytes"].encode()) == spans["bytes"].span_bytes


@pytest.mark.parametrize("name", ["gpt2", "bytes"])
def test_val_targets_cover_the_span_once(builtin_pair, name):
    ds, tok = builtin_pair[name]
    batches = val_batches(ds, tok, seq_len=256, batch=8, max_bytes=100_000)
    span = batches.span.tokens
    ys = torch.cat([y for _, y in batches]).reshape(-1).numpy()
    assert (ys[len(span) - 1:] == -1).all()  # padding
    targets = span[1:]
    np.testing.assert_array_equal(ys[:len(span) - 1] != -1, tok.token_bytes[targets] > 0)
    np.testing.assert_array_equal(ys[ys != -1], targets[tok.token_bytes[targets] > 0])
    assert int(tok.token_bytes[ys[ys != -1]].sum()) == batches.span_bytes


def test_uniform_byte_predictor_scores_8_bits_per_byte(builtin_pair):
    ds, tok = builtin_pair["bytes"]
    batches = val_batches(ds, tok, seq_len=512, batch=4, max_bytes=50_000)
    total = 0.0
    for x, y in batches:
        logits = torch.zeros(*x.shape, 256, dtype=torch.float64)
        total += F.cross_entropy(logits.view(-1, 256), y.view(-1), ignore_index=-1,
                                 reduction="sum").item()
    assert total == pytest.approx(batches.span_bytes * math.log(256))
    assert bits_per_byte(total, batches.span_bytes) == pytest.approx(8.0, abs=1e-9)


def test_val_span_with_appended_eot_and_a_long_first_document():
    tok = get_tokenizer("bytes")
    stream = np.array(tok.encode("ab") + [256] + tok.encode("cde") + [256], dtype=np.uint16)
    ds = Dataset("toy", "bytes", [stream], [stream], "0" * 64, eot_placement="append")
    span = val_span(ds, tok, 4)
    assert span.tokens.tolist() == [256, 97, 98, 256] and span.span_bytes == 2  # EOT added
    assert val_span(ds, tok, 1).n_docs == 1  # a document is never cut: at least one whole
    assert val_span(ds, tok, 10**6).span_bytes == 5
    with pytest.raises(DataError, match="holds bytes tokens"):
        val_span(ds, type("T", (), {"name": "gpt2"})(), 4)


def test_val_span_takes_the_documents_that_fit_when_the_first_is_too_long():
    tok = get_tokenizer("bytes")
    docs = ["a" * 50, "bcd", "efghij", "kl"]
    stream = np.array([t for d in docs for t in tok.encode(d) + [256]], dtype=np.uint16)
    ds = Dataset("toy", "bytes", [stream], [stream], "0" * 64, eot_placement="append")
    span = val_span(ds, tok, 4)
    assert span.n_docs == 1 and span.span_bytes == 3 and span.tokens.tolist() == [256, 98, 99, 100, 256]
    assert val_span(ds, tok, 2).span_bytes == 2                  # "kl", the first that fits
    both = val_span(ds, tok, 5)                                  # "bcd" and "kl", skipping "efghij"
    assert both.n_docs == 2 and both.tokens.tolist() == [256, 98, 99, 100, 256, 107, 108, 256]
    assert val_span(ds, tok, 1).span_bytes == 50                 # none fits: the first, whole
    assert val_span(ds, tok, 55).span_bytes == 53                # the first fits: as before


def test_the_loader_feeds_side_values_aligned_with_each_batch():
    """BLT's cached entropies travel as a side array: every batch hands the values at its inputs'
    positions (here the side array is the tokens themselves, so it must equal x)."""
    arrays = coded_shards()
    fed = []
    loader = Loader(arrays, 4, 16, seed=1, side=[a.astype(np.float32) for a in arrays],
                    feed=fed.append)
    for _ in range(len(loader) + 2):   # into the second epoch
        x, _ = loader.next()
        assert fed[-1].dtype == torch.float32 and torch.equal(fed[-1], x.float())
    with pytest.raises(DataError, match="do not match the shards"):
        Loader(arrays, 4, 16, side=[a[:-1] for a in arrays], feed=fed.append)
