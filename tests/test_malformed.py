"""Malformed graphs: each one gives a clear, located error (file:line:), exit 2, no traceback,
in under a second.

Every bad graph is the small valid BASE graph below with one targeted edit, so that each case
reads as "what is wrong". A case names the fragment its message must contain and the line the
message must point at (given as a piece of text: the line of its first occurrence in the bad
file, or as a number).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from graphs.check import main

BASE = """\
# A small GPT-style graph: the base that every malformed case edits.
name: base
description: a two-layer pre-LayerNorm transformer
vars:
  vocab_size: 256
  seq_len: 32
  d_model: 64
  n_layer: 2
  n_head: 4
sizes:
  tiny: {}
  small:
    d_model: 128
nodes:
  tok: {type: embedding, in: tokens, vocab: vocab_size, dim: d_model}
  pos: {type: position_embedding, in: tokens, max_seq: seq_len, dim: d_model}
  x: {type: add, in: [tok, pos]}
  h:
    repeat: n_layer
    in: x
    body:
      ln_1: {type: layernorm, in: stream}
      attn: {type: attention, in: ln_1, heads: n_head}
      r1: {type: add, in: [stream, attn]}
      ln_2: {type: layernorm, in: r1}
      mlp: {type: mlp, in: ln_2, hidden: 4 * d_model}
      r2: {type: add, in: [r1, mlp]}
  ln_f: {type: layernorm, in: h}
  head: {type: lm_head, in: ln_f, vocab: vocab_size, tie: tok}
  loss: {type: cross_entropy, in: [head, targets]}
outputs: {logits: head, loss: loss}
training:
  lr: 0.0006
  batch_tokens: 4096
"""

LIMIT_S = 1.0


def edit(*pairs: tuple[str, str], base: str = BASE) -> str:
    """BASE with each `old` (which must occur exactly once) replaced by `new`."""
    text = base
    for old, new in pairs:
        assert text.count(old) == 1, f"edit target {old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


@dataclass
class Case:
    id: str
    text: str | bytes | Callable[[Path], str | bytes]  # the file, or a function of tmp_path
    expect: str                                        # fragment of the located message
    line: int | str                                    # line number, or text on that line
    args: tuple = ()                                   # extra CLI arguments


def _laughs(tmp: Path) -> str:
    rows = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        rows.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return edit(("description: a two-layer pre-LayerNorm transformer\n",
                 "description: a two-layer pre-LayerNorm transformer\nlaughs:\n" +
                 "\n".join(rows) + "\n"))


def _python_apply(tmp: Path) -> str:
    return edit(("name: base", f"name: !!python/object/apply:os.system ['touch {tmp / 'pwned'}']"))


def _python_name(tmp: Path) -> str:
    return edit(("name: base", "name: !!python/name:os.system ''"))


def _big(tmp: Path) -> bytes:
    pad = ("# " + "x" * 98 + "\n").encode()
    return BASE.encode() + pad * (50 * 1024 * 1024 // len(pad))


BODY_TAIL = "      r2: {type: add, in: [r1, mlp]}\n"

CASES = [
    # ---- reading the file: bytes, YAML syntax, unsafe YAML
    Case("empty-file", "", "empty", 1),
    Case("only-a-comment", "# nothing but a comment\n", "empty", 1),
    Case("non-utf8-bytes", BASE.replace("two-layer", "two\xff\xfelayer").encode("latin-1"),
         "not valid UTF-8", "two"),
    Case("control-character", edit(("two-layer", "two\x07layer")), "not allowed", "two"),
    Case("file-of-50MB", _big, "limited to", 1),
    Case("top-level-list", "- name: base\n- nodes: {}\n", "must be a mapping at the top level", 1),
    Case("yaml-bad-indentation", edit(("  d_model: 64", "   d_model: 64")),
         "YAML syntax error", "d_model: 64"),
    Case("yaml-unclosed-bracket", edit(("in: [tok, pos]}", "in: [tok, pos}")),
         "YAML syntax error", "in: [tok, pos}"),
    Case("yaml-tab-indentation", edit(("  seq_len: 32", "\tseq_len: 32")),
         "YAML syntax error", "seq_len"),
    Case("two-documents", BASE + "---\nname: second\n", "YAML syntax error", "---"),
    Case("python-object-apply-tag", _python_apply, "not allowed", "!!python"),
    Case("python-name-tag", _python_name, "not allowed", "!!python"),
    Case("custom-tag", edit(("d_model: 64", "d_model: !big 64")), "not allowed", "!big"),
    Case("billion-laughs", _laughs, "alias", "l0: &l0"),
    Case("recursive-alias", edit(("name: base", "name: base\nloop: &a [*a]")), "nesting", "loop"),
    Case("deep-nesting-10000", edit(("description: a two-layer pre-LayerNorm transformer",
                                     "description: " + "[" * 10_000 + "]" * 10_000)),
         "nesting", "description"),
    Case("duplicate-key", edit(("  d_model: 64\n", "  d_model: 64\n  d_model: 128\n")),
         "duplicate key 'd_model'", "d_model: 128"),
    Case("name-dot-dot", edit(("name: base", "name: ..")), "not a valid name", "name: .."),
    Case("non-scalar-key", edit(("name: base", "name: base\n? [a, b]\n: 1")), "plain scalars", "? [a"),
    # ---- top level
    Case("missing-nodes", edit((BASE[BASE.index("nodes:"):BASE.index("outputs:")], "")),
         "missing required 'nodes'", "name: base"),
    Case("missing-tiny-size", edit(("  tiny: {}\n", "")), "missing required 'tiny'", "sizes:"),
    Case("unknown-top-level-key", edit(("training:", "trainig:")),
         "did you mean 'training'", "trainig:"),
    Case("unknown-size", BASE, "did you mean 'tiny'", "sizes:", ("--size", "tiy")),
    Case("set-unknown-variable", BASE, "did you mean 'd_model'", "vars:", ("--set", "d_modle=128")),
    Case("set-without-value", BASE, "KEY=VALUE", "name: base", ("--set", "d_model")),
    Case("set-out-of-bounds", BASE, "out of bounds", "lr:", ("--set", "training.lr=-1")),
    # ---- blocks and parameters
    Case("unknown-block-near-miss", edit(("ln_1: {type: layernorm", "ln_1: {type: layrnorm")),
         "did you mean 'layernorm'", "layrnorm"),
    Case("unknown-parameter-near-miss", edit(("heads: n_head", "haeds: n_head")),
         "did you mean 'heads'", "haeds"),
    Case("missing-required-parameter", edit((", heads: n_head", "")),
         "missing required 'heads'", "attn:"),
    Case("string-for-bool", edit(("ln_2: {type: layernorm, in: r1}",
                                  "ln_2: {type: layernorm, in: r1, bias: 'yes'}")),
         "expected true or false", "bias: 'yes'"),
    Case("bool-for-int", edit(("heads: n_head", "heads: true")), "heads", "heads: true"),
    Case("out-of-bounds-literal", edit(("lr: 0.0006", "lr: 50")), "out of bounds", "lr: 50"),
    Case("out-of-bounds-expression", edit(("hidden: 4 * d_model", "hidden: 100000 * d_model")),
         "out of bounds", "hidden:"),
    Case("bad-choice-value", edit(("ln_2: {type: layernorm, in: r1}",
                                   "ln_2: {type: layernorm, in: r1}\n      act_: {type: mlp, "
                                   "in: ln_2, hidden: 8, act: gleu}")),
         "did you mean 'gelu'", "gleu"),
    Case("heads-not-multiple-of-kv-heads", edit(("heads: n_head", "heads: n_head, kv_heads: 3")),
         "multiple of kv_heads", "kv_heads"),
    Case("choice-with-unknown-block", edit(("ln_1: {type: layernorm", "ln_1: {type: {choice: "
                                            "[layernorm, rmsnrm]}")),
         "did you mean 'rmsnorm'", "rmsnrm"),
    # ---- expressions and variables
    Case("expression-syntax", edit(("hidden: 4 * d_model", "hidden: (4 * d_model")),
         "expected ')'", "hidden:"),
    Case("expression-bad-character", edit(("hidden: 4 * d_model", "hidden: 4 * d_model; 1")),
         "unexpected character", "hidden:"),
    Case("unknown-variable", edit(("hidden: 4 * d_model", "hidden: 4 * d_modl")),
         "did you mean 'd_model'", "hidden:"),
    Case("unknown-function", edit(("hidden: 4 * d_model", "hidden: 4 * sqr(d_model)")),
         "did you mean 'sqrt'", "hidden:"),
    Case("division-by-zero", edit(("hidden: 4 * d_model", "hidden: d_model // (n_layer - 2)")),
         "division by zero", "hidden:"),
    Case("huge-power", edit(("hidden: 4 * d_model", "hidden: 10 ** 1000")), "out of range", "hidden:"),
    Case("variable-cycle", edit(("  n_head: 4\n", "  n_head: n_kv * 2\n  n_kv: n_head // 2\n")),
         "cycle", "n_head:"),
    Case("non-integer-vocab", edit(("vocab_size: 256", "vocab_size: 256.5")),
         "positive integer", "vocab_size:"),
    # ---- edges
    Case("dangling-edge-top-level", edit(("in: ln_f,", "in: ln_ff,")),
         "did you mean 'ln_f'", "ln_ff"),
    Case("dangling-edge-in-body", edit(("in: ln_2, hidden", "in: ln2, hidden")),
         "did you mean 'ln_2'", "ln2"),
    Case("edge-cycle-top-level", edit(("in: [tok, pos]", "in: [tok, ln_f]")), "cycle", "x: {"),
    Case("edge-cycle-in-body", edit(("ln_1: {type: layernorm, in: stream}",
                                     "ln_1: {type: layernorm, in: r2}")), "cycle", "ln_1:"),
    Case("tokens-into-layernorm", edit(("ln_f: {type: layernorm, in: h}",
                                        "ln_f: {type: layernorm, in: tokens}")),
         "must be hidden", "ln_f:"),
    Case("logits-into-add", edit(("  loss: {", "  bad: {type: add, in: [head, head]}\n  loss: {")),
         "adds residual streams", "bad:"),
    Case("unknown-output-port", edit(("in: ln_f,", "in: ln_f.weight,")), "no output 'weight'",
         "ln_f.weight"),
    Case("output-not-logits", edit(("{logits: head,", "{logits: ln_f,")),
         "must be logits", "outputs:"),
    Case("tie-to-unknown-node", edit(("tie: tok", "tie: tk")), "did you mean 'tok'", "tie: tk"),
    Case("heads-not-dividing-width", edit(("n_head: 4", "n_head: 5")),
         "not divisible by heads=5", "attn:"),
    Case("add-of-two-widths", edit(("max_seq: seq_len, dim: d_model", "max_seq: seq_len, dim: 32")),
         "must have one kind", "x: {"),
    Case("cross-layer-future", edit(("in: [r1, mlp]}", "in: [r1, mlp@layer + 1]}")),
         "earlier layers", "mlp@"),
    Case("cross-layer-at-top-level", edit(("in: ln_f,", "in: ln_f@0,")),
         "only a node inside a repeat body", "ln_f@0"),
    Case("reserved-node-id", edit(("  ln_f: {type: layernorm, in: h}", "  layer: {type: layernorm, in: h}"),
                                  ("in: ln_f,", "in: layer,")),
         "reserved name", "  layer: {"),
    Case("node-id-forward", edit(("  ln_f: {type: layernorm, in: h}", "  forward: {type: layernorm, in: h}"),
                                 ("in: ln_f,", "in: forward,")),
         "clashes with a PyTorch module attribute", "forward:"),
    # ---- repeat groups
    Case("nested-repeat", edit((BODY_TAIL, BODY_TAIL + "      inner:\n        repeat: 2\n        "
                                "in: r2\n        body:\n          n: {type: layernorm, in: stream}\n")),
         "cannot be nested", "repeat: 2"),
    Case("repeat-zero", edit(("repeat: n_layer", "repeat: 0")), "out of bounds", "repeat: 0"),
    Case("repeat-a-billion", edit(("repeat: n_layer", "repeat: 1000000000")),
         "above the limit", "repeat:"),
    Case("repeat-a-billion-via-variable", edit(("n_layer: 2", "n_layer: 1000000000")),
         "above the limit", "repeat:"),
    Case("body-out-unknown", edit(("    in: x\n", "    in: x\n    out: r_2\n")),
         "did you mean 'r2'", "out: r_2"),
    Case("size-of-1e15-parameters", edit(("d_model: 64", "d_model: 1048576"),
                                         ("n_layer: 2", "n_layer: 1000")),
         "parameters need about", "vars:"),
    Case("declared-size-of-1e15-parameters",
         edit(("  tiny: {}\n", "  tiny: {}\n  huge: {d_model: 1048576, n_layer: 100}\n")),
         "1.32e+15 parameters", "vars:", ("--size", "huge")),
    # ---- search-space markers
    Case("marker-empty-choice", edit(("n_head: 4", "n_head: {choice: []}")), "non-empty", "n_head:"),
    Case("marker-int-low-above-high", edit(("n_layer: 2", "n_layer: {int: [4, 2], default: 2}")),
         "above high", "n_layer:"),
    Case("marker-default-outside-range", edit(("n_layer: 2", "n_layer: {int: [1, 4], default: 8}")),
         "default 8", "n_layer:"),
    Case("marker-range-without-default", edit(("n_layer: 2", "n_layer: {int: [1, 4]}")),
         "needs a default", "n_layer:"),
    Case("marker-log-low-zero", edit(("lr: 0.0006", "lr: {float: [0.0, 0.01], log: true, default: 0.001}")),
         "low > 0", "lr:"),
    Case("marker-unknown-key", edit(("n_layer: 2", "n_layer: {int: [1, 4], default: 2, stepp: 1}")),
         "did you mean 'step'", "n_layer:"),
    Case("marker-choice-default-not-an-option",
         edit(("n_head: 4", "n_head: {choice: [4, 8], default: 2}")), "not one of the options", "n_head:"),
]


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """Check a valid graph once so that no case pays one-off import and cache costs."""
    path = tmp_path_factory.mktemp("warm") / "base.yaml"
    path.write_text(BASE)
    assert main([str(path)]) == 0
    assert main([str(path), "--size", "all"]) == 0


def _line_of(text: str | bytes, line: int | str) -> int:
    if isinstance(line, int):
        return line
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for i, row in enumerate(text.splitlines(), start=1):
        if line in row:
            return i
    raise AssertionError(f"anchor {line!r} not in the case's text")


def _write(case: Case, tmp_path: Path) -> tuple[Path, str | bytes]:
    text = case.text(tmp_path) if callable(case.text) else case.text
    path = tmp_path / f"{case.id}.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path, text


def test_enough_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed(case: Case, tmp_path, capsys):
    path, text = _write(case, tmp_path)
    capsys.readouterr()
    start = time.perf_counter()
    rc = main([str(path), *case.args])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert rc == 2, f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err and "internal error" not in err, err
    assert re.search(rf"^{re.escape(str(path))}:\d+:\d+: ", err, re.M), err
    lines = [row for row in err.splitlines() if case.expect in row]
    assert lines, f"expected {case.expect!r} in:\n{err}"
    want = _line_of(text, case.line)
    assert any(row.startswith(f"{path}:{want}:") for row in lines), \
        f"expected line {want} for {case.expect!r}:\n{err}"
    assert elapsed < LIMIT_S, f"took {elapsed:.2f} s"
    assert not (tmp_path / "pwned").exists()


def test_python_tag_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(_python_apply(tmp_path))
    assert main([str(path)]) == 2
    assert not marker.exists()
    assert "tag:yaml.org,2002:python/object/apply:os.system" in capsys.readouterr().err


# ---- the CLI as users run it

@pytest.fixture(scope="module")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _cli(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphs.check", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case_id", ["python-object-apply-tag", "unknown-block-near-miss", "empty-file"])
def test_cli_subprocess(case_id, tmp_path, repo_root):
    case = next(c for c in CASES if c.id == case_id)
    path, _ = _write(case, tmp_path)
    proc = _cli(repo_root, str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{path}:" in proc.stderr and case.expect in proc.stderr
    assert not (tmp_path / "pwned").exists()


# ---- valid graphs pass

GRAPHS = sorted((Path(__file__).resolve().parent.parent / "graphs").glob("*.yaml"))


@pytest.mark.parametrize("graph", GRAPHS, ids=[g.name for g in GRAPHS])
def test_shipped_graphs_pass_at_every_size(graph, capsys):
    assert main([str(graph), "--size", "all"]) == 0, capsys.readouterr().err


def test_gpt2_is_124m(repo_root):
    proc = _cli(repo_root, "graphs/gpt2.yaml")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^parameters\s+124,4\d\d,\d{3} \(124\.4\d M\)", proc.stdout, re.M), proc.stdout
