"""Hostile files: an export never writes outside its folder, and the app never reads a path
outside the tracking store it was given, whatever the store's runs name (`..`, absolute paths,
links planted inside it). Reads are watched with an audit hook (`open`, `os.listdir`,
`os.scandir`), each path resolved, so a read through a link counts where it lands."""
from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import pytest
import yaml
from conftest import ROOT

import graphs
from graphs.export.__main__ import main as export_main

LLAMA = ROOT / "graphs" / "llama.yaml"
SMALL = ["--size", "tiny", "--set", "vocab_size=512"]
STANDALONE = {"model.py", "config.json", "generate.py", "README.md", "model.safetensors"}
SECRET = "root:x:0:0:not-for-the-app\n"


# ---- what the process opens, resolved

WATCHED: list[Path] = []   # folders a read of which is recorded
READS: list[str] = []
AUDITED = ("open", "os.listdir", "os.scandir")


def _audit(event: str, args) -> None:
    if not WATCHED or event not in AUDITED or not args or isinstance(args[0], int) or args[0] is None:
        return
    try:
        real = Path(os.path.realpath(os.fsdecode(args[0])))
    except (TypeError, ValueError):  # never break the code under test
        return
    if any(real == w or w in real.parents for w in WATCHED):
        READS.append(f"{event} {args[0]} -> {real}")


sys.addaudithook(_audit)  # for the rest of the process: a no-op while nothing is watched


@pytest.fixture
def watch():
    """watch(folder) records every read that lands in `folder` until the test ends."""
    def start(folder: Path) -> list[str]:
        WATCHED.append(Path(os.path.realpath(folder)))
        return READS
    yield start
    WATCHED.clear()
    READS.clear()


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: file contents, link targets, folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                    p.read_bytes() if p.is_file() else "<dir>")
    return out


def test_the_watcher_sees_a_read_through_a_link(tmp_path, watch):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "outside" / "f")
    reads = watch(tmp_path / "outside")
    (tmp_path / "link").read_text()
    assert len(reads) == 1 and reads[0].startswith(f"open {tmp_path / 'link'}")


# ---- export: nothing outside --out is written

def export(out: Path, *extra: str) -> int:
    return export_main([str(LLAMA), *SMALL, "--init-seed", "0", "--out", str(out), *extra])


@pytest.fixture
def planted(tmp_path):
    """An out folder (tmp/out) and a folder beside it (tmp/elsewhere) holding a victim file."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "victim").write_text("mine")
    return out, elsewhere


def test_links_planted_at_every_output_name_are_replaced_not_followed(planted):
    out, elsewhere = planted
    for i, name in enumerate(sorted(STANDALONE)):    # a file link, a dangling one, a folder link
        kind = i % 3
        link = elsewhere / "victim" if kind == 0 else elsewhere / f"new{i}" if kind == 1 else elsewhere
        (out / name).symlink_to(link)
    before = tree(elsewhere)
    assert export(out, "--force") == 0
    assert tree(elsewhere) == before                    # nothing written, created or removed there
    for name in STANDALONE:
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert {p.name for p in out.iterdir()} == STANDALONE  # no staging folder left behind


def test_a_hard_link_or_fifo_in_the_out_folder_is_not_written_through(planted):
    out, elsewhere = planted
    os.link(elsewhere / "victim", out / "model.py")
    os.mkfifo(out / "config.json")                      # writing into it would block for ever
    def hung(*_):
        raise TimeoutError("the export blocked on the FIFO")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        assert export(out, "--force") == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert (elsewhere / "victim").read_text() == "mine"
    assert "class LlamaModel" in (out / "model.py").read_text()
    assert json.loads((out / "config.json").read_text())["graph_name"] == "llama"


def test_a_linked_format_folder_is_replaced_not_followed(planted):
    out, elsewhere = planted
    (out / "standalone").symlink_to(elsewhere, target_is_directory=True)
    (out / "hf").symlink_to(Path("..") / "elsewhere")
    before = tree(elsewhere)
    assert export(out, "--force", "--format", "standalone,hf") == 0
    assert tree(elsewhere) == before
    assert (out / "standalone").is_dir() and not (out / "standalone").is_symlink()
    assert STANDALONE <= {p.name for p in (out / "standalone").iterdir()}
    assert (out / "hf" / "config.json").is_file() and not (out / "hf").is_symlink()


def test_a_folder_in_the_way_fails_before_anything_is_written(planted, capsys):
    out, _ = planted
    (out / "model.safetensors").mkdir()
    assert export(out, "--force") == 2
    assert "model.safetensors is a folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]   # all or nothing


@pytest.mark.parametrize("where, name", [("name", "../../escaped"), ("name", ".."),
                                         ("name", "/tmp/escaped-abs"), ("node", "../../escaped")])
def test_hostile_graph_and_node_names_write_nothing_outside_out(tmp_path, where, name):
    """Names with a slash fail the schema; `..` passes it as a graph name, and is only text."""
    graph = yaml.safe_load(LLAMA.read_text())
    if where == "name":
        graph["name"] = name
    else:
        graph["nodes"][name] = graph["nodes"].pop("tok")
    src = tmp_path / "deep" / "er" / "g.yaml"
    src.parent.mkdir(parents=True)
    src.write_text(yaml.safe_dump(graph, sort_keys=False))
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    code = export_main([str(src), *SMALL, "--init-seed", "0", "--out", str(out)])
    created = set(tmp_path.rglob("*")) - before
    assert created == ({out, *(out / n for n in STANDALONE)} if code == 0 else set()), created
    assert code in (0, 2) and not Path("/tmp/escaped-abs").exists()


def _run_folder(base: Path, pointer: str) -> Path:
    run = base / "run"
    (run / "step_1").mkdir(parents=True)
    (run / "graph.yaml").write_text(LLAMA.read_text())
    (run / "latest").write_text(pointer + "\n")
    return run


@pytest.mark.parametrize("pointer", ["../../elsewhere/step_1", "/etc", "..", "step_1/../../x"])
def test_a_latest_pointer_leaving_the_run_folder_is_refused(tmp_path, pointer, capsys):
    run = _run_folder(tmp_path, pointer)
    assert export_main([str(run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a step folder of the run" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_json_that_is_not_an_object_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\0" * 8)
    (ckpt / "state.json").write_text("[1, 2]")
    args = [str(LLAMA), *SMALL, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert export_main(args) == 2
    assert "not a JSON object" in capsys.readouterr().err


# ---- the app: nothing outside the store's folder is read

def _graph_text() -> str:
    g = graphs.load(LLAMA, "tiny", ["vocab_size=512"]).resolve()
    return yaml.safe_dump(g.data, sort_keys=False)


@functools.cache
def _weights(text: str) -> tuple[bytes, str]:
    """(model.safetensors bytes, graph hash) of the graph, built once."""
    from safetensors.torch import save_model

    plan = graphs.elaborate(graphs.loads(text))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(graphs.build(plan, seed=0), f"{tmp}/m")
        return Path(f"{tmp}/m").read_bytes(), plan.hash


def _checkpoint(folder: Path, text: str) -> None:
    data, graph_hash = _weights(text)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    (folder / "state.json").write_text(json.dumps({"graph_hash": graph_hash, "step": 1}))


def _run_dir(folder: Path, text: str, latest: str = "step_1") -> Path:
    _checkpoint(folder / "step_1", text)
    (folder / "graph.yaml").write_text(text)
    (folder / "latest").write_text(latest + "\n")
    (folder / "result.json").write_text(json.dumps({"status": "completed", "val_loss": 5.0}))
    return folder


class Store:
    """A SQLite store in tmp/store and, beside it, tmp/outside: a complete run folder, a secret
    file and an artifact folder, none of which the app may read."""

    def __init__(self, base: Path):
        from mlflow import MlflowClient

        self.root, self.outside = base / "store", base / "outside"
        self.root.mkdir()
        self.uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.text = _graph_text()
        _run_dir(self.outside / "run", self.text)
        (self.outside / "secret.txt").write_text(SECRET)
        (self.outside / "run_config.json").write_text('{"secret": true}')
        self.exp = self.client.create_experiment("hostile", str(self.root / "mlartifacts" / "hostile"))
        self.ids: dict[str, str] = {}

    def run(self, name: str, tags=None, exp=None, artifacts: dict | None = None) -> str:
        r = self.client.create_run(exp or self.exp, run_name=name, tags={"graph_hash": "ab", **(tags or {})})
        self.ids[name] = r.info.run_id
        uri = r.info.artifact_uri
        folder = Path(url2pathname(urlsplit(uri).path) if uri.startswith("file:") else uri)
        for rel, what in (artifacts or {}).items():
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(what, Path):
                p.symlink_to(what)
            elif what == "checkpoint":
                _checkpoint(p, self.text)
            else:
                p.write_text(what)
        return r.info.run_id


GOOD = {"graph.yaml": None, "run_config.json": '{"lr": 0.01}'}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("hostile"))
    out, root, text = s.outside, s.root, s.text
    good = {**GOOD, "graph.yaml": text, "checkpoint": "checkpoint"}
    _run_dir(root / "runs" / "good", text)
    s.run("good-folder", {"run_dir": "runs/good"})
    s.run("good-artifacts", artifacts=good)
    # run folders named outside, or leading outside
    s.run("tag-absolute", {"run_dir": str(out / "run")})
    s.run("tag-dotdot", {"run_dir": "../outside/run"})
    s.run("tag-etc", {"run_dir": "../../../../../../../../../../etc"})
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / "linked").symlink_to(out / "run")
    s.run("tag-link", {"run_dir": "runs/linked"})
    _run_dir(root / "runs" / "latest-out", text, latest="../../../outside/run/step_1")
    s.run("latest-escapes", {"run_dir": "runs/latest-out"})
    _run_dir(root / "runs" / "latest-abs", text, latest=str(out / "run" / "step_1"))
    s.run("latest-absolute", {"run_dir": "runs/latest-abs"})
    step = _run_dir(root / "runs" / "step-link", text) / "step_1"
    for f in step.iterdir():
        f.unlink()
    step.rmdir()
    step.symlink_to(out / "run" / "step_1")
    s.run("step-link", {"run_dir": "runs/step-link"})
    g = _run_dir(root / "runs" / "graph-link", text) / "graph.yaml"
    g.unlink()
    g.symlink_to(out / "run" / "graph.yaml")
    s.run("graph-link", {"run_dir": "runs/graph-link"})
    r = _run_dir(root / "runs" / "result-link", text) / "result.json"
    r.unlink()
    r.symlink_to(out / "secret.txt")
    s.run("result-link", {"run_dir": "runs/result-link"})
    # artifacts that are links leading outside
    s.run("artifact-link", artifacts={**good, "graph.yaml": out / "run" / "graph.yaml",
                                      "run_config.json": out / "run_config.json"})
    s.run("artifact-folder-link", artifacts={"graph.yaml": text, "checkpoint": out / "run" / "step_1"})
    s.run("artifact-weights-link", artifacts={"graph.yaml": text, "checkpoint/state.json": "{}",
                                              "checkpoint/model.safetensors":
                                                  out / "run" / "step_1" / "model.safetensors"})
    # artifact locations outside the store: absolute, file: URI, relative (MLflow stores the
    # first two as given and makes a relative one absolute, so that one is written in by hand)
    for kind, location in (("absolute", str(out / "art-abs")), ("file-uri", (out / "art-uri").as_uri()),
                           ("relative", str(out / "art-rel"))):
        exp = s.client.create_experiment(f"outside-{kind}", location)
        s.run(f"location-{kind}", exp=exp, artifacts=good)
    with sqlite3.connect(root / "mlflow.db") as db:
        db.execute("UPDATE runs SET artifact_uri = ? WHERE run_uuid = ?",
                   (f"../outside/art-rel/{s.ids['location-relative']}/artifacts", s.ids["location-relative"]))
    s.run("bad-json", {"run_dir": "runs/none"}, artifacts={**good, "run_config.json": "{not json"})
    s.run("../../../etc/passwd", artifacts=good)
    return s


REFUSED_FOLDERS = ["tag-absolute", "tag-dotdot", "tag-etc", "tag-link"]
REFUSED_EXPORTS = ["latest-escapes", "latest-absolute", "step-link", "graph-link", "result-link",
                   "artifact-link", "artifact-folder-link", "artifact-weights-link",
                   "location-absolute", "location-file-uri", "location-relative"]


@pytest.fixture
def in_store(hostile, monkeypatch, watch):
    """The store's folder as the working directory (a relative artifact location is read from
    there, as MLflow would), and reads of the outside folder recorded."""
    monkeypatch.chdir(hostile.root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", hostile.uri)
    return hostile, watch(hostile.outside)


def test_the_good_runs_export_from_their_folder_and_from_artifacts(in_store):
    from app.export import export_run

    s, reads = in_store
    a = export_run(s.uri, s.ids["good-folder"])
    b = export_run(s.uri, s.ids["good-artifacts"])
    assert a.source == str(s.root / "runs" / "good") and b.source == "MLflow artifacts"
    assert STANDALONE <= set(a.files) and STANDALONE <= set(b.files) and not a.note and not b.note
    assert reads == []


@pytest.mark.parametrize("name", REFUSED_FOLDERS + REFUSED_EXPORTS)
def test_a_run_naming_a_path_outside_the_store_is_refused_unread(in_store, name):
    from app.export import ExportFailed, export_run

    s, reads = in_store
    with pytest.raises(ExportFailed, match="outside the store's folder|not a step folder") as e:
        export_run(s.uri, s.ids[name])
    assert "Traceback" not in str(e.value)
    assert reads == [], reads


# from <store>/mlartifacts/hostile/<run>/artifacts, five steps up is the store's parent
@pytest.mark.parametrize("path", ["../../../../../outside/secret.txt", "/etc/passwd", "OUTSIDE/secret.txt",
                                  "checkpoint/../../../../../../outside/secret.txt"])
def test_artifact_paths_leaving_the_run_are_refused(in_store, path):
    from app import runfiles

    s, reads = in_store
    path = path.replace("OUTSIDE", str(s.outside))
    with pytest.raises(runfiles.OutsideStore, match="outside the store's folder"):
        runfiles.artifact_text(s.uri, s.ids["good-artifacts"], path)
    assert runfiles.artifact_text(s.uri, s.ids["good-artifacts"], "../../../../outside/secret.txt") is None
    assert reads == []


def test_artifact_listing_marks_links_out_and_refuses_locations_out(in_store):
    from app import runfiles

    s, reads = in_store
    listed = {a["path"]: a for a in runfiles.artifacts(s.uri, s.ids["artifact-link"])}
    assert listed["graph.yaml"]["refused"] and listed["graph.yaml"]["bytes"] is None
    weights = listed["checkpoint/model.safetensors"]
    assert weights["bytes"] > 0 and "refused" not in weights
    folder_link = runfiles.artifacts(s.uri, s.ids["artifact-folder-link"])
    assert [a["path"] for a in folder_link if a.get("refused")] == ["checkpoint"]   # not descended
    for kind in ("absolute", "file-uri", "relative"):
        with pytest.raises(runfiles.OutsideStore, match="artifact location"):
            runfiles.artifacts(s.uri, s.ids[f"location-{kind}"])
        with pytest.raises(runfiles.OutsideStore):
            runfiles.artifact_text(s.uri, s.ids[f"location-{kind}"], "graph.yaml")
    assert runfiles.artifact_text(s.uri, s.ids["good-artifacts"], "graph.yaml") == s.text
    assert reads == []


def test_zip_name_of_a_hostile_run_name_is_one_plain_file_name(in_store):
    from app.export import export_run

    s, _ = in_store
    name = export_run(s.uri, s.ids["../../../etc/passwd"]).name
    assert name == "etc-passwd-export.zip"


def test_run_page_shows_refusals_as_messages_never_a_traceback(in_store):
    from streamlit.testing.v1 import AppTest

    s, reads = in_store
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=60).run()
    at.session_state["run_pick"] = s.ids["artifact-link"]
    at.switch_page("app_pages/run.py").run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 2 and all("Refused" in e and "outside the store's folder" in e for e in errors)
    assert any("graph.yaml" in w.value and "Not read" in w.value for w in at.warning)
    assert not any(SECRET.strip() in c.value for c in at.code)
    at.button(key="export").click().run()
    assert not at.exception and any(e.value.startswith("Export failed:") and "outside" in e.value
                                    for e in at.error)
    at.session_state["run_pick"] = s.ids["bad-json"]
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("not valid JSON" in w.value for w in at.warning)
    assert reads == [], reads


def test_the_app_binds_to_localhost_wherever_it_is_started(tmp_path):
    """`streamlit run app/main.py` reads app/.streamlit/config.toml (the CLI sets the main script's
    path, then parses the config files): from a folder without one, with an empty HOME."""
    code = ("import sys; from streamlit import config; config._main_script_path = sys.argv[1]; "
            "config.get_config_options(force_reparse=True); "
            "print(config.get_option('server.address'), config.get_option('server.enableXsrfProtection'))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "app" / "main.py")], cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["localhost", "True"]
