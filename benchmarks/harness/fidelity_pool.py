"""How the quality harness's runs execute (benchmarks/fidelity.py): one JSON line a finished run in a stage's
JSONL (a rerun skips what is there; a failed run is tried again), and a pool that fits items in this process or
on Ray actors, where a crashed run or a dead actor costs that run alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

log = logging.getLogger("fidelity")


# --- the JSONL --------------------------------------------------------------------------------------------


def load_lines(path: str) -> list[dict]:
    """Every line of a stage's JSONL (a line cut short by a kill is skipped, with a warning)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (a run killed while writing?); ignored", path, i)
    return out


def append_line(path: str, line: dict) -> None:
    """One more line; a line a kill cut short stays alone on its line (and is skipped when read)."""
    cut = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(line, default=str) + "\n")


def finished(path: str) -> set[str]:
    """Keys of the runs finished in `path` (a failed run is tried again)."""
    return {r["key"] for r in load_lines(path) if "failed" not in r}


def run_pool(cfg, worker_cls: type, args: tuple, items: list, on_line: Callable[[dict], None]) -> None:
    """Every item through `worker_cls(*args).fit(item)` (a list of result lines; it catches its own errors): in
    this process with `cfg.workers` 1, else on Ray actors (`on_ray`)."""
    if cfg.workers > 1:
        return on_ray(cfg, worker_cls, args, items, on_line)
    worker = worker_cls(*args)
    for item in items:
        for line in worker.fit(item):
            on_line(line)


def on_ray(cfg, worker_cls: type, args: tuple, items: list, on_line: Callable[[dict], None]) -> None:
    """`run_pool` on --workers Ray actors of one CPU each; an actor that dies is replaced and its item recorded as
    failed (`worker_cls.died(item, reason)`). Ray's ActorPool neither replaces a dead actor nor goes on."""
    import sys

    import ray
    import ray.cloudpickle

    for name in ("harness.fidelity_pool", "harness.fidelity_runs", "harness.fidelity_news"):
        if name in sys.modules:  # the actors cannot import benchmarks/: ship these by value
            ray.cloudpickle.register_pickle_by_value(sys.modules[name])
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=cfg.workers, include_dashboard=False, log_to_driver=False)
    Actor = ray.remote(num_cpus=1, num_gpus=1 / cfg.workers if cfg.device == "cuda" else 0)(worker_cls)
    queue, in_flight = list(items)[::-1], {}

    def submit(actor) -> None:
        if queue:
            item = queue.pop()
            in_flight[actor.fit.remote(item)] = (actor, item)

    for _ in range(min(cfg.workers, len(queue))):
        submit(Actor.remote(*args))
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        actor, item = in_flight.pop(ref)
        try:
            lines = ray.get(ref)
        except ray.exceptions.RayError as e:
            lines = worker_cls.died(item, f"the worker died: {type(e).__name__}: {e}"[:2000])
            actor = Actor.remote(*args)
        for line in lines:
            on_line(line)
        submit(actor)
    if started:
        ray.shutdown()
