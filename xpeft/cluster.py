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
