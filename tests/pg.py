"""A throwaway PostgreSQL server on 127.0.0.1 for tests (Optuna's RDB storage shared by processes).

Uses Debian's server binaries (`apt-get install postgresql`, done by `.ci/install-system`). The
cluster lives in a fresh directory under /tmp, owned by the `postgres` system user when we are
root (PostgreSQL refuses to run as root), with trust authentication, listening on loopback only,
on a free port, with its Unix socket inside that directory. Durability is switched off: the data
is thrown away afterwards.

    with PostgresServer() as server:
        url = server.url("optuna")       # postgresql+psycopg2://postgres@127.0.0.1:PORT/optuna
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = (
    "run the README's test command from the repository root, which installs them: "
    ".ci/install-system && pip install torch==2.13.0 -e '.[test]' && "
    "python -m search.tokenizer install && python -m pytest -q"
)
SERVICE_USER = "postgres"
READY_TIMEOUT_S = 30.0


class PostgresError(RuntimeError):
    """The server could not be set up; the message says why and what to do."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_bindir() -> Path:
    """The directory with initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        found.append(os.path.realpath(on_path))
    for initdb in found:
        bindir = Path(initdb).parent
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin "
        f"or on PATH; {INSTALL_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start in __enter__/start(), pg_ctl stop + rm -rf in __exit__/stop()."""

    def __init__(self, bindir: Path | None = None, ready_timeout_s: float = READY_TIMEOUT_S):
        self.bindir = bindir or find_bindir()
        self.ready_timeout_s = ready_timeout_s
        self.base: Path | None = None
        self.port: int | None = None
        self.started = False

    # -- paths and commands --------------------------------------------------------------------

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    @property
    def logfile(self) -> Path:
        return self.base / "server.log"

    def _as_service_user(self) -> list[str]:
        """The prefix that runs a command as `postgres` when we are root (nothing otherwise)."""
        if os.geteuid() != 0:
            return []
        if shutil.which("runuser"):
            return ["runuser", "-u", SERVICE_USER, "--"]
        # su takes one shell string; our arguments never hold spaces or quotes
        return ["su", SERVICE_USER, "-s", "/bin/sh", "-c"]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        prefix = self._as_service_user()
        cmd = prefix + ([" ".join(args)] if prefix[:1] == ["su"] else list(args))
        env = dict(os.environ, LC_ALL="C", LANG="C", PGTZ="UTC")
        env.pop("PGDATA", None)
        return subprocess.run(cmd, cwd=self.base, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        try:
            self._make_base()
            self._initdb()
            self._start_on_free_port()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_base(self) -> None:
        # Our own directory straight under /tmp (world-traversable), not pytest's tmp_path, whose
        # parents may be 0700 root; handed to `postgres` when we are root.
        self.base = Path(tempfile.mkdtemp(prefix="lm-playground-pg-", dir="/tmp"))
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam(SERVICE_USER)
            except KeyError:
                raise PostgresError(f"no '{SERVICE_USER}' system user (PostgreSQL refuses to run "
                                    f"as root and Debian's package creates it); {INSTALL_HINT}")
            os.chown(self.base, user.pw_uid, user.pw_gid)
        os.chmod(self.base, 0o700)

    def _initdb(self) -> None:
        self.sockdir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.sockdir, SERVICE_USER, SERVICE_USER)
        r = self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SERVICE_USER,
                      "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", timeout=120)
        if r.returncode != 0:
            raise PostgresError(f"initdb failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")

    def _configure(self, port: int) -> None:
        # postgresql.auto.conf is read after postgresql.conf, so these win; it keeps its owner
        with open(self.data / "postgresql.auto.conf", "w") as f:
            f.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 100\n"
                "shared_buffers = 32MB\n"
            )

    def _start_on_free_port(self, attempts: int = 3) -> None:
        # free_port() can lose a race with another process binding the same port: retry
        for _ in range(attempts):
            self.port = free_port()
            self._configure(self.port)
            r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile),
                          "-w", "-t", str(int(self.ready_timeout_s)), "start",
                          timeout=self.ready_timeout_s + 15)
            if r.returncode == 0:
                self.started = True
                return
            log = self._log_tail()
            if "could not bind" not in log and "in use" not in log:
                break
        raise PostgresError(f"pg_ctl start failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}\n"
                            f"server log:\n{self._log_tail()}")

    def _wait_ready(self) -> None:
        """Until a TCP connection to 127.0.0.1:PORT is accepted, at most ready_timeout_s."""
        try:
            import psycopg2
        except ImportError:
            raise PostgresError(f"the psycopg2 driver is not installed; {INSTALL_HINT}")
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user=SERVICE_USER,
                                 dbname="postgres", connect_timeout=3).close()
                return
            except psycopg2.OperationalError as e:
                if time.monotonic() > deadline:
                    raise PostgresError(f"server on 127.0.0.1:{self.port} not accepting connections "
                                        f"after {self.ready_timeout_s:.0f} s: {e}\n"
                                        f"server log:\n{self._log_tail()}")
                time.sleep(0.1)

    def create_database(self, name: str) -> None:
        import psycopg2

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SERVICE_USER,
                                dbname="postgres", connect_timeout=5)
        try:
            conn.autocommit = True  # CREATE DATABASE can't run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def url(self, dbname: str = "postgres") -> str:
        """A SQLAlchemy URL for the psycopg2 driver."""
        return f"postgresql+psycopg2://{SERVICE_USER}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut) and remove its directory. Idempotent."""
        if self.base is None:
            return
        try:
            if self.started or (self.data / "postmaster.pid").exists():
                r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                              "-w", "-t", "30", "stop", timeout=45)
                if r.returncode != 0 and (self.data / "postmaster.pid").exists():
                    # last resort, so no server outlives the tests with its files deleted
                    self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                              "immediate", "-w", "-t", "10", "stop", timeout=20)
        finally:
            self.started = False
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
