"""Where a job's Ray comes from: the cluster it was submitted to, or an embedded one for this process."""

from __future__ import annotations

import os


def init_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False, log_to_driver: bool = True
) -> None:
    """Join the cluster at `address` (default RAY_ADDRESS, which `ray job submit` sets), or start an embedded
    local Ray for this process only, even where another Ray runs on the machine (token auth off: it is
    reachable from this machine alone)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=log_to_driver)


def object_store_usage() -> dict[str, float]:
    """This cluster's object-store usage (what `ray memory --stats-only` prints): MiB and objects.

    Ray's public route to it is the State API, which needs the dashboard; the farm's jobs and tests run
    without one, so this reads the same summary the `ray memory` command does through Ray's internal API (the
    one private call in xpeft, here alone)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return {"plasma_mib": int(m.group(1)), "objects": int(m.group(2))} if m else {"raw": text}


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
