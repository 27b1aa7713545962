"""Private RabbitMQ nodes for fault tests: start, kill, restart and cluster them on this machine
without touching its shared broker.

The machine's RabbitMQ (``rabbit@localhost``, port 5672) serves every test and every engineer
here, so a test that kills or restarts a broker does it to nodes of its own, started with
``rabbitmq-server`` 3.10 from a temporary directory:

* node name ``saga-test-<id>-<n>@localhost``; AMQP and Erlang distribution ports picked free
  below the kernel's ephemeral port range (so no outgoing connection takes them between a kill
  and a restart), both on 127.0.0.1 only (``RABBITMQ_NODE_PORT``, ``RABBITMQ_DIST_PORT``,
  ``-kernel inet_dist_use_interface``);
* its own data, log and plugin-expansion directories and PID file (``RABBITMQ_MNESIA_BASE``,
  ``RABBITMQ_LOG_BASE``, ``RABBITMQ_PLUGINS_EXPAND_DIR``, ``RABBITMQ_PID_FILE``), its own
  ``rabbitmq.conf`` (``RABBITMQ_CONFIG_FILE``: the machine's one would open 5672 again) and a
  missing advanced config;
* no plugins: an empty ``RABBITMQ_ENABLED_PLUGINS_FILE`` and ``RABBITMQ_ENABLED_PLUGINS=""``,
  so no management (15672) or Prometheus (15692) listener competes with the shared node's;
* an empty ``RABBITMQ_CONF_ENV_FILE``: the machine's ``/etc/rabbitmq/rabbitmq-env.conf`` names
  the shared node;
* ``HOME`` is the temporary directory, whose ``.erlang.cookie`` the nodes of one cluster and
  the ``rabbitmqctl`` calls made for them share; the shared node's cookie is never read.

The scripts are run directly from ``/usr/lib/rabbitmq/bin`` (Debian's ``/usr/sbin`` wrappers
switch to the ``rabbitmq`` user and its home, hence to the shared node's cookie), or from
``SAGA_TEST_RABBITMQ_BIN``. Every ``rabbitmqctl`` call goes through :meth:`RabbitNode.ctl`,
which always passes ``-n <private node>`` and the private environment, so it cannot reach the
shared node. A node is stopped by signals to its own processes: SIGKILL to its process group
(the wrapper script and the Erlang VM) for a crash, SIGTERM to the Erlang VM for a graceful stop.

The fixtures kill their nodes when they end, whatever the outcome, and a small reaper process
kills them if the test process itself dies without cleaning up (SIGKILL, a CI timeout).
Starting a node takes about five seconds (longer on a busy machine), so the three-node cluster
is session-scoped and each test gets a virtual host of its own on it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import unavailable

_DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
_USER = "guest"  # the default user; RabbitMQ lets it in from localhost only, which is all we use
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_START_WITHIN = 180.0  # seconds; about 5 s on an idle machine, 10x that and more when loaded


def rabbitmq_scripts() -> Path | None:
    """The directory holding the ``rabbitmq-server`` and ``rabbitmqctl`` scripts, if any."""
    configured = os.environ.get("SAGA_TEST_RABBITMQ_BIN")
    candidates = [Path(configured)] if configured else []
    candidates.append(_DEBIAN_SCRIPTS)
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").is_file() and (directory / "rabbitmqctl").is_file():
            return directory
    return None


# --- processes --------------------------------------------------------------------------------


class _Reaper:
    """A process that SIGKILLs the registered process groups when its stdin closes, i.e. when
    the test process exits by any means; a clean exit has unregistered them all."""

    _CODE = (
        "import os, signal, sys\n"
        "groups = set()\n"
        "for line in sys.stdin:\n"
        "    (groups.add if line[0] == '+' else groups.discard)(int(line[1:]))\n"
        "for group in groups:\n"
        "    try:\n"
        "        os.killpg(group, signal.SIGKILL)\n"
        "    except ProcessLookupError:\n"
        "        pass\n"
    )

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self._lock:
            if self._process is None:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", self._CODE],
                    stdin=subprocess.PIPE,
                    text=True,
                    start_new_session=True,  # a Ctrl-C to the test run must not kill it first
                )
            assert self._process.stdin is not None
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()

    def watch(self, group: int) -> None:
        """Kill process group ``group`` if this process dies."""
        self._send(f"+{group}")

    def forget(self, group: int) -> None:
        """``group`` is gone: do not kill it (its number may be reused)."""
        self._send(f"-{group}")

    def close(self) -> None:
        """Let the reaper exit, killing what is still registered (at a normal exit)."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=30)


_reaper = _Reaper()
"""Started with the first node; it exits with the test process (its stdin closes then)."""
atexit.register(_reaper.close)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a process from a later one with its pid), or
    None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(root: int) -> dict[int, str]:
    """Every live process under ``root`` (Erlang's port helpers run in sessions of their own,
    so the process group does not hold them all), with its start time."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                parents[int(entry.name)] = parent
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                started = _start_time(child)
                if started is not None:
                    found[child] = started
                    frontier.append(child)
    return found


def free_private_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range (and away from
    ``rabbitmqctl``'s own 35672-35682)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(200):
        port = random.randrange(20000, min(ephemeral, 35672))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for a private RabbitMQ node")


def _answers_amqp(port: int) -> bool:
    """Whether a broker on ``port`` answers the AMQP 0-9-1 protocol header with a frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            connection.sendall(_AMQP_HEADER)
            return connection.recv(1) == b"\x01"  # a method frame: connection.start
    except OSError:
        return False


# --- one node ---------------------------------------------------------------------------------


@dataclass
class RabbitNode:
    """A private RabbitMQ node: its name, ports and directories, and its processes when running.

    The directories and ports stay the same across restarts, so a restarted node recovers its
    data and rejoins its cluster.
    """

    name: str
    amqp_port: int
    dist_port: int
    directory: Path
    home: Path
    """Holds the ``.erlang.cookie`` this node shares with its cluster."""
    scripts: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _beam: int | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The AMQP URL of the default virtual host on this node."""
        return self.vhost_url("/")

    def vhost_url(self, vhost: str) -> str:
        """The AMQP URL of ``vhost`` on this node."""
        return f"amqp://{_USER}:{_USER}@127.0.0.1:{self.amqp_port}/{quote(vhost, safe='')}"

    @property
    def running(self) -> bool:
        """Whether the node's processes are up (it may still be booting)."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        """RabbitMQ's own log of this node."""
        return self.directory / "log" / f"{self.name}.log"

    def environment(self) -> dict[str, str]:
        """The environment ``rabbitmq-server`` and ``rabbitmqctl`` run with for this node.

        Built from scratch rather than from ours, so that no inherited ``RABBITMQ_*`` or
        ``NODENAME`` variable can point it at the shared node.
        """
        d = self.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_ENABLED_PLUGINS": "",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(d / "node.pid"),
            # An epmd started by this node (when none runs yet) listens on loopback only.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_files(self) -> None:
        d = self.directory
        for sub in ("mnesia", "log", "plugins-expand"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.amqp_port}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )

    def start(self, within: float = _START_WITHIN) -> None:
        """Start the node (on its existing data, if any) and wait until it speaks AMQP.

        Raises:
            RuntimeError: it exited or did not answer in time; the message ends with its output.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self._write_files()
        output = (self.directory / "server.out").open("ab")
        try:
            self._process = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self.environment(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the unit kill() signals
            )
        finally:
            output.close()
        _reaper.watch(self._process.pid)
        deadline = time.monotonic() + within
        while not _answers_amqp(self.amqp_port):
            if self._process.poll() is not None:
                self._reap()
                raise RuntimeError(f"{self.name} exited at start-up: {self._output_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.name} did not answer AMQP within {within:g} s: {self._output_tail()}"
                )
            time.sleep(0.2)
        self._beam = self._find_beam()

    def _find_beam(self) -> int:
        """The Erlang VM's pid: the one in the PID file, checked to be our script's child."""
        assert self._process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.directory / "node.pid").read_text().strip())
                if _parent(pid) == self._process.pid:
                    return pid
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} runs but its PID file names no process of ours")

    def kill(self) -> None:
        """Crash the node: SIGKILL to its process group (the Erlang VM and its start script)."""
        process = self._process
        if process is None:
            return
        helpers = _descendants(process.pid)
        if process.poll() is None:  # once reaped, its group number could belong to another
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self._reap(helpers)

    def stop(self, within: float = 60.0) -> None:
        """Stop the node gracefully (SIGTERM to the Erlang VM); kill it if that takes too long."""
        process = self._process
        if process is None:
            return
        if process.poll() is None and self._beam is not None:
            helpers = _descendants(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._beam, signal.SIGTERM)
            try:
                process.wait(timeout=within)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            self._reap(helpers)
        else:
            self.kill()

    def restart(self, *, hard: bool = True, within: float = _START_WITHIN) -> None:
        """Kill (``hard``) or stop the node, then start it again on the same data and ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start(within)

    def _reap(self, helpers: dict[int, str] | None = None) -> None:
        """Wait for the node's processes to be gone; SIGKILL port helpers that outlive it."""
        process = self._process
        assert process is not None
        process.wait(timeout=60)
        _reaper.forget(process.pid)
        # Erlang's port helpers (erl_child_setup, inet_gethost, the disk monitor's shell) exit
        # when the VM goes; any that has not after a while is killed, if it is still the same
        # process (same start time).
        deadline = time.monotonic() + 10
        remaining = dict(helpers or {})
        while remaining and time.monotonic() < deadline:
            remaining = {p: t for p, t in remaining.items() if _start_time(p) == t}
            time.sleep(0.05)
        for pid, started in remaining.items():
            if _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._process = None
        self._beam = None

    def ctl(self, *arguments: str, timeout: float = 120) -> str:
        """Run ``rabbitmqctl -n <this node> ...`` and return its output.

        The node is always named, and the environment is this node's (its cookie), so the
        command cannot reach the machine's shared node.
        """
        result = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", self.name, "-q", *arguments],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {self.name} {' '.join(arguments)} failed: "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def _output_tail(self, lines: int = 15) -> str:
        texts = []
        for path in (self.directory / "server.out", self.log_file):
            with contextlib.suppress(OSError):
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return " | ".join(texts) or "(no output)"


# --- a group of nodes, and a cluster ----------------------------------------------------------


class RabbitNodes:
    """Private nodes created in one directory, sharing one Erlang cookie; kills them on close."""

    def __init__(self, directory: Path, scripts: Path) -> None:
        self.directory = directory
        self.scripts = scripts
        self.run_id = uuid.uuid4().hex[:8]
        self.nodes: list[RabbitNode] = []
        cookie = directory / ".erlang.cookie"
        cookie.write_text("".join(random.choices(string.ascii_uppercase, k=20)))
        cookie.chmod(0o400)  # Erlang refuses a cookie file others can read

    def node(self) -> RabbitNode:
        """A new node (not started yet) with free ports and a fresh directory."""
        name = f"saga-test-{self.run_id}-{len(self.nodes) + 1}@localhost"
        directory = self.directory / name.partition("@")[0]
        directory.mkdir()
        amqp = free_private_port()
        dist = free_private_port()
        while dist == amqp:
            dist = free_private_port()
        node = RabbitNode(name, amqp, dist, directory, self.directory, self.scripts)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Kill every node of this group and drop their data (their logs stay)."""
        for node in self.nodes:
            node.kill()
            shutil.rmtree(node.directory / "mnesia", ignore_errors=True)


@dataclass
class RabbitCluster:
    """Private nodes clustered together (``nodes[0]`` is the one the others joined)."""

    nodes: tuple[RabbitNode, ...]

    @classmethod
    def form(cls, group: RabbitNodes, size: int = 3) -> RabbitCluster:
        """Start ``size`` nodes and join the others to the first one."""
        nodes = tuple(group.node() for _ in range(size))
        with ThreadPoolExecutor(size) as pool:
            list(pool.map(lambda node: node.start(), nodes))
        first = nodes[0]
        for node in nodes[1:]:
            # The documented way to join a node that has already booted: stop the RabbitMQ
            # application (the Erlang VM stays up), reset it, join, start it again.
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        cluster = cls(nodes)
        running = cluster.running_nodes()
        if running != {node.name for node in nodes}:
            raise RuntimeError(f"the cluster formed with {sorted(running)} only")
        return cluster

    def urls(self, vhost: str, nodes: tuple[int, ...] | None = None) -> str:
        """``SAGA_AMQP_URL`` for ``vhost``: the nodes' URLs (all, or those indexed), by commas."""
        chosen = self.nodes if nodes is None else tuple(self.nodes[i] for i in nodes)
        return ",".join(node.vhost_url(vhost) for node in chosen)

    def any_running(self) -> RabbitNode:
        """A node whose processes run, to send a command through."""
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the private cluster is running")

    def running_nodes(self) -> set[str]:
        """The nodes the cluster reports running."""
        status = self.any_running().ctl("cluster_status", "--formatter", "json")
        running: list[str] = json.loads(status)["running_nodes"]
        return set(running)

    def ensure_running(self) -> None:
        """Start any node that is down (an earlier test may have failed before restarting it).

        A node answers AMQP only once it has booted, which includes rejoining the cluster.
        """
        for node in self.nodes:
            if not node.running:
                node.start()

    @contextlib.contextmanager
    def temporary_vhost(self) -> Iterator[str]:
        """A fresh virtual host on the cluster for the guest user; deleted afterwards."""
        name = f"saga-test-{uuid.uuid4().hex[:10]}"
        self.any_running().ctl("add_vhost", name)
        try:
            self.any_running().ctl("set_permissions", "-p", name, _USER, ".*", ".*", ".*")
            yield name
        finally:
            self.any_running().ctl("delete_vhost", name)


# --- fixtures ---------------------------------------------------------------------------------


def _scripts_or_skip() -> Path:
    scripts = rabbitmq_scripts()
    if scripts is None:
        unavailable(
            "rabbitmq-server",
            "its scripts are neither in /usr/lib/rabbitmq/bin nor on PATH "
            "(set SAGA_TEST_RABBITMQ_BIN to their directory)",
        )
    return scripts


@pytest.fixture
def private_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own, running; killed when the test ends."""
    group = RabbitNodes(tmp_path_factory.mktemp("rabbit"), _scripts_or_skip())
    try:
        node = group.node()
        node.start()
        yield node
    finally:
        group.close()


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """A private three-node RabbitMQ cluster for the whole session; killed at its end.

    Tests share it, each on a virtual host of its own (:func:`cluster_vhost`); a test that
    kills a node restarts it, and :func:`cluster_vhost` restarts any node left down.
    """
    group = RabbitNodes(tmp_path_factory.mktemp("rabbit-cluster"), _scripts_or_skip())
    try:
        yield RabbitCluster.form(group)
    finally:
        group.close()


@pytest.fixture
def cluster_vhost(rabbit_cluster: RabbitCluster) -> Iterator[str]:
    """A fresh virtual host on the private cluster, with every node running."""
    rabbit_cluster.ensure_running()
    with rabbit_cluster.temporary_vhost() as vhost:
        yield vhost
