"""Throwaway scale-out infrastructure on one machine: a PostgreSQL server and a Ray cluster of several nodes.

They let the tests and benchmarks run the multi-machine paths for real on a single host, on loopback ports, each
in its own temporary folder, and take everything down again. Neither is needed to search: on real machines, use
a PostgreSQL server and `ray start` as the README shows.

    with LocalPostgres() as pg:
        url = pg.create_database("study")  # postgresql://postgres@127.0.0.1:PORT/study

    with LocalRayCluster(nodes=2) as cluster:
        env = cluster.env()  # RAY_AUTH_MODE=token and the cluster's token, for every driver
        cluster.stop_node(1)  # a worker node dies
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the project: Ray workers import its modules from here
PG_USER = "postgres"  # the server's superuser, and the account that runs the server when this process is root


class InfrastructureUnavailable(RuntimeError):
    """A local server or cluster cannot be started here (what is missing, or what failed, is in the message)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (a folder of ours), from /proc."""
    pids = []
    for entry in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            cmdline = Path(entry).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry.split("/")[2])
        if marker in cmdline and pid != os.getpid():
            pids.append(pid)
    return pids


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH, in its versioned lib folder).

    Raises:
        InfrastructureUnavailable: PostgreSQL's server is not installed.
    """
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]))
    if not versions:
        raise InfrastructureUnavailable("PostgreSQL's server is not installed (apt-get install postgresql)")
    return Path(versions[-1]).parent


class LocalPostgres:
    """A PostgreSQL server in a fresh folder, listening on 127.0.0.1 only, with trust authentication.

    initdb and pg_ctl refuse to run as root: as root, the server runs as the `postgres` account that Debian's
    package creates. Durability is switched off (fsync, synchronous commit): it is thrown away afterwards.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.folder: Path | None = None
        self.bin = postgres_bin()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(PG_USER)
            except KeyError:
                raise InfrastructureUnavailable(f"running as root and there is no {PG_USER!r} account to run "
                                                f"PostgreSQL as (Debian's postgresql package creates it)") from None
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            self._uid, self._gid = account.pw_uid, account.pw_gid

    @property
    def url(self) -> str:
        """The server's maintenance database."""
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd="/", **self._as)
        if done.returncode != 0:
            raise InfrastructureUnavailable(f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip()}")

    def start(self) -> LocalPostgres:
        self.folder = Path(tempfile.mkdtemp(prefix="shufflenas-pg-"))
        if self._as:
            os.chown(self.folder, self._uid, self._gid)
        data = self.folder / "data"
        self._run(self.bin / "initdb", "-D", data, "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.folder} "
                   f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(self.bin / "pg_ctl", "-D", data, "-l", self.folder / "server.log", "-w", "-t", "60", "-o",
                  options, "start")
        return self

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        createdb = self.bin / "createdb"
        if not createdb.exists():
            createdb = Path(shutil.which("createdb") or createdb)
        self._run(createdb, "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name)
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            self._run(self.bin / "pg_ctl", "-D", self.folder / "data", "-m", "immediate", "-w", "stop")
        except InfrastructureUnavailable:
            _kill(_pids_with(str(self.folder)))
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalRayCluster:
    """A Ray cluster of `nodes` nodes on this machine: `ray start --head`, then `ray start --address` for the rest.

    Every node and driver runs with RAY_AUTH_MODE=token and this cluster's own token (Ray 2.60 refuses nodes and
    drivers without it), on 127.0.0.1, with its own temporary folder, so it touches neither ~/.ray nor another
    Ray instance on the machine. `ray stop` would stop every Ray process of the machine: nodes are stopped here by
    killing the processes of their own ports and folder.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, token: str | None = None) -> None:
        if nodes < 1:
            raise ValueError(f"nodes {nodes} must be at least 1")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.token = token or uuid.uuid4().hex
        self.port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.folder: Path | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a node or driver of this cluster needs (its workers import the project from ROOT)."""
        base = dict(os.environ if base is None else base)
        path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH", "")) if p)
        return {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": path,
                # A lost node is declared dead after 3 missed health checks of 1 s (Ray's default: 5 of 3 s).
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}

    def _ray(self, *args: str) -> None:
        ray = Path(sys.executable).with_name("ray")
        cmd = [str(ray) if ray.exists() else "ray", "start", "--node-ip-address", "127.0.0.1",
               "--num-cpus", str(self.cpus_per_node), "--disable-usage-stats", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=120)
        if done.returncode != 0:
            raise InfrastructureUnavailable(f"ray start failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    def start(self) -> LocalRayCluster:
        self.folder = Path(tempfile.mkdtemp(prefix="shufflenas-ray-"))  # short: Ray's socket paths must fit 107 bytes
        self._ray("--head", "--port", str(self.port), "--temp-dir", str(self.folder), "--include-dashboard=false",
                  "--node-manager-port", str(self.node_ports[0]), "--dashboard-port", str(free_port()),
                  "--dashboard-agent-listen-port", str(free_port()))
        for k in range(1, self.nodes):
            self.start_node(k)
        return self

    def start_node(self, k: int) -> None:
        """Start (or restart) worker node `k` (1 .. nodes-1)."""
        self._ray("--address", self.address, "--node-manager-port", str(self.node_ports[k]),
                  "--dashboard-agent-listen-port", str(free_port()))

    def _raylets(self, k: int) -> list[int]:
        return [p for p in _pids_with(f"--node_manager_port={self.node_ports[k]}") if str(self.folder) in _cmdline(p)]

    def running(self, k: int, task: str = "ImplicitFunc") -> bool:
        """Whether node `k` runs a `task` now (Ray names a busy worker process `ray::<task>...`). Tune trials are
        ImplicitFunc actors, titled `ray::ImplicitFunc.train` only while the trial's function runs: before its
        first report and after its last, the actor is alive but has nothing to lose."""
        return any(_cmdline(c).startswith(f"ray::{task}") for p in self._raylets(k) for c in _children(p))

    def stop_node(self, k: int) -> None:
        """Kill node `k`'s raylet and the processes it started, as a machine that is lost would be."""
        raylets = self._raylets(k)
        _kill(raylets + [c for p in raylets for c in _children(p)])

    def stop(self) -> None:
        """Stop every node (the head last), and remove the cluster's folder."""
        if self.folder is None:
            return
        for k in range(1, self.nodes):
            self.stop_node(k)
        for _ in range(3):  # workers that were starting when their parent died
            pids = _pids_with(str(self.folder)) + [c for p in _pids_with(str(self.folder)) for c in _children(p)]
            if not pids:
                break
            _kill(pids)
            time.sleep(0.5)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(entry).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
