"""CPU seconds and memory of the processes a serving benchmark runs, from /proc (Linux): the client (this
process), the Serve proxy, the replica, and the rest of Ray (GCS, raylet, controller, idle workers), so a
table can show which of them used the machine's cores."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
ROLES = ("client", "proxy", "replica", "ray other")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after "(comm)": state is [0], ppid [1]


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Ray's GCS and raylet are children of the driver, workers of the
    raylet)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def role(pid: int, root: int) -> str:
    if pid == root:
        return "client"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray other"
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeReplica" in cmd:
        return "replica"
    return "ray other"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of all the process's threads so far (0 once it has exited)."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / TICK


def cpu_by_role(root: int | None = None) -> dict[str, float]:
    """CPU seconds used so far, summed by role, over `root` (default: this process) and its descendants."""
    root = root or os.getpid()
    out = dict.fromkeys(ROLES, 0.0)
    for pid in descendants(root):
        out[role(pid, root)] += cpu_seconds(pid)
    return out


def replica_pids(root: int | None = None) -> list[int]:
    root = root or os.getpid()
    return [p for p in descendants(root) if role(p, root) == "replica"]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set size now and its peak (VmRSS, VmHWM), MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "peak_mb": out.get("VmHWM", 0.0)}
