"""What the kernel says about processes: CPU time and resident memory from ``/proc``.

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (clock ticks, 10 ms here): user and system
time of every thread of the process, which is what a process costs the machine. The broker is
the ``beam.smp`` process (shared with anyone else using the machine's RabbitMQ, so each row
also measures its idle rate and subtracts it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` so far, or ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _fields(path: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The values of ``keys`` in a ``/proc`` file of ``key: value`` lines; empty if the
    process is gone."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    pairs = (line.partition(":") for line in lines)
    return {key: value.strip() for key, _, value in pairs if key in keys}


def write_calls(pid: int) -> int | None:
    """Write system calls ``pid`` has made so far (``syscw`` of ``/proc/<pid>/io``: socket
    sends and file writes alike), or ``None`` if it is gone."""
    found = _fields(f"/proc/{pid}/io", ("syscw",))
    return int(found["syscw"]) if "syscw" in found else None


def rss_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of ``pid`` in KiB; empty if it is gone."""
    found = _fields(f"/proc/{pid}/status", ("VmRSS", "VmHWM"))
    return {key: int(value.split()[0]) for key, value in found.items()}


def comm(pid: int) -> str:
    """The process's short name (``/proc/<pid>/comm``), or ``""``."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pids_named(name: str) -> list[int]:
    """Every process whose short name is ``name``."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and comm(int(entry.name)) == name
    ]


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (IPv4 or IPv6), if any."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def broker_pid(port: int = 5672) -> int | None:
    """The RabbitMQ node serving AMQP on ``port`` here: the ``beam.smp`` listening on it."""
    pid = listener_pid(port)
    if pid is not None and comm(pid) == "beam.smp":
        return pid
    found = pids_named("beam.smp")
    return found[0] if len(found) == 1 else None


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        kids: list[int] = []
        for task in tasks:
            text = (task / "children").read_text().split()
            kids.extend(int(child) for child in text)
        return kids
    except OSError:
        return []


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


@dataclass
class CpuMeter:
    """CPU seconds and write system calls of a set of named processes between :meth:`start`
    and the last :meth:`sample`.

    A process that appears after :meth:`start` is counted from zero (it started meanwhile);
    one that disappears before :meth:`stop` keeps its last reading.
    """

    before: dict[str, dict[int, tuple[float, int]]]
    last: dict[str, dict[int, tuple[float, int]]]

    @classmethod
    def start(cls, groups: Mapping[str, Iterable[int]]) -> CpuMeter:
        """Read every process of every group now."""
        before = {name: _read(pids) for name, pids in groups.items()}
        return cls(before, {name: dict(values) for name, values in before.items()})

    def sample(self, groups: Mapping[str, Iterable[int]]) -> None:
        """Read the groups again (new members join at zero)."""
        for name, pids in groups.items():
            self.last.setdefault(name, {}).update(_read(pids))
            self.before.setdefault(name, {})

    def seconds(self) -> dict[str, float]:
        """CPU seconds spent per group since :meth:`start`."""
        return self._spent(0)

    def write_calls(self) -> dict[str, float]:
        """Write system calls made per group since :meth:`start`."""
        return self._spent(1)

    def _spent(self, field: int) -> dict[str, float]:
        spent: dict[str, float] = {}
        for name, values in self.last.items():
            base = self.before.get(name, {})
            spent[name] = sum(
                value[field] - base.get(pid, (0.0, 0))[field] for pid, value in values.items()
            )
        return spent


def _read(pids: Iterable[int]) -> dict[int, tuple[float, int]]:
    values: dict[int, tuple[float, int]] = {}
    for pid in pids:
        seconds = cpu_seconds(pid)
        writes = write_calls(pid)
        # Gone between the two reads: keep its last reading rather than count writes from 0.
        if seconds is not None and writes is not None:
            values[pid] = (seconds, writes)
    return values
