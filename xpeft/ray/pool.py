"""The farm's actors (`ProfileActor`: a backbone loaded once, a pool's bank and configs) and their pool: fit every
profile on a pool of Ray actors, largest first, losing none.

Work goes only to actors that are up (an actor the cluster cannot place holds no profile hostage). An actor
that dies has its profile put back and is replaced; a profile is retried up to `max_retries` times, then
recorded as failed with the reason. A profile whose data is bad (`BadProfileData`) is rejected at once.
Ray's own `ray.util.ActorPool` hands work out the same way but neither replaces a dead actor nor retries.

A pass ends with its actors alive: `WarmActors` keeps them for the next pass of the same driver (an sa run's
second pool, the next `run_farm`), which reconfigures them with its bank instead of starting new processes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

import ray
import torch
from tqdm import tqdm

from xpeft.config import TrainConfig, XPeftConfig
from xpeft.core.bank import bank_from_object
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.data.dataset import ProfileData
from xpeft.fit.profile import BadProfileData, ProfileFitter
from xpeft.ray.cluster import rss_bytes

log = logging.getLogger(__name__)


class ProfileWorker:
    """A farm actor's state: the encoder and tokenizer, loaded once; the shared bank, configs and head of the
    pool it fits for (`configure`: a kept actor's next pool gives it its own)."""

    def __init__(self, backbone: str, threads: int, *pool):
        """`backbone` loaded on `threads` torch threads; `pool`: what `configure` takes, the first pool's."""
        torch.set_num_threads(max(1, threads))
        # An actor given a GPU (FarmConfig.gpus_per_actor) fits there; Ray sets CUDA_VISIBLE_DEVICES to it.
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.encoder, self.tokenizer = load_encoder(backbone), load_tokenizer(backbone)
        self.configure(*pool)

    def configure(
        self,
        bank_obj: dict | None,
        xcfg: XPeftConfig,
        tcfg: TrainConfig,
        shared_head: dict | None,
        head_id: str | None,
        label_names: list[str] | None,
    ) -> bool:
        """Fit for another pool from now on: its bank, configs and head, on the encoder already loaded (frozen,
        so a fitter leaves it as it found it)."""
        self.bank_zero_copy = bank_obj is not None and not bank_obj["A"].flags.writeable
        bank = bank_from_object(bank_obj) if bank_obj is not None else None
        self.fitter = ProfileFitter(
            self.encoder, self.tokenizer, bank, xcfg, tcfg, shared_head, head_id, label_names, device=self.device
        )
        return True

    def ready(self) -> bool:
        return True

    def fit(self, data: ProfileData, xcfg: XPeftConfig | None = None, tcfg: TrainConfig | None = None) -> dict:
        out = self.fitter.with_configs(xcfg or self.fitter.xcfg, tcfg or self.fitter.tcfg).fit(data)
        return {"profile": out.profile, "seconds": out.seconds, "dropped": out.dropped, "pid": os.getpid()}

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "bank_zero_copy": self.bank_zero_copy,
            "device": self.device,
            "node_id": ray.get_runtime_context().get_node_id(),
        }


ProfileActor = ray.remote(ProfileWorker)


class FarmPool:
    """One pass of a pool of actors over a queue of profiles. `start_actor()` gives an actor with `fit(data)`
    and `info()` methods and the ref that resolves once it can fit; `on_result(result)` gets every fitted
    profile's result."""

    def __init__(
        self,
        start_actor: Callable[[], tuple[Any, Any]],
        max_retries: int,
        on_result: Callable[[dict], None],
        report,
        progress: bool = True,
    ):
        self.start_actor, self.max_retries, self.on_result, self.report = start_actor, max_retries, on_result, report
        self.queue: list[ProfileData] = []
        self.attempts: dict[str, int] = {}
        self.starting: dict[Any, Any] = {}  # readiness ref -> actor still starting
        self.ready: list[Any] = []
        self.in_flight: dict[Any, tuple[Any, ProfileData]] = {}
        self.progress = progress
        self.first_result = True

    def run(self, datas: list[ProfileData], num_actors: int) -> list[Any]:
        """Fit every profile of `datas`; returns, when each is stored, rejected or failed, the actors still up."""
        self.queue = sorted(datas, key=lambda d: (-d.size, d.profile_id))[::-1]  # pop() takes the largest
        self.bar = tqdm(total=len(datas), desc="profiles", unit="profile", disable=not self.progress)
        self.start = time.perf_counter()
        for _ in range(min(num_actors, len(self.queue))):
            self.spawn()
        self.report.actors = max(self.report.actors, len(self.starting))
        while self.in_flight or (self.queue and self.starting):
            [ref], _ = ray.wait(list(self.in_flight) + list(self.starting), num_returns=1)
            if ref in self.starting:
                self.on_started(ref)
            else:
                self.on_done(ref)
        self.bar.close()
        for data in self.queue:  # only when no actor could ever start
            self.report.failed[data.profile_id] = "no actor could be started (not enough resources in the cluster?)"
        return self.finish()

    def spawn(self) -> None:
        actor, ready = self.start_actor()
        self.starting[ready] = actor

    def submit(self, actor) -> None:
        if self.queue:
            data = self.queue.pop()  # the end of the queue holds the largest
            self.in_flight[actor.fit.remote(data)] = (actor, data)

    def retry(self, data: ProfileData, reason: str) -> None:
        pid = data.profile_id
        self.attempts[pid] = self.attempts.get(pid, 0) + 1
        if self.attempts[pid] <= self.max_retries:
            self.report.retries += 1
            self.queue.append(data)
        else:
            self.report.failed[pid] = reason
            self.bar.update(1)

    def on_started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:  # died while starting: try another
            self.spawn()
            return
        self.ready.append(actor)
        self.submit(actor)

    def on_done(self, ref) -> None:
        actor, data = self.in_flight.pop(ref)
        pid = data.profile_id
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # the worker died mid-profile: replace it, retry
            log.warning("actor died while fitting %s: %s", pid, type(e).__name__)
            self.ready.remove(actor)
            self.retry(data, f"worker died {self.attempts.get(pid, 0) + 1} times: {type(e).__name__}")
            self.spawn()
            busy = {a for a, _ in self.in_flight.values()}
            for idle in [a for a in self.ready if a not in busy]:
                self.submit(idle)
            return
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, Exception) else e
            if isinstance(cause, BadProfileData):
                self.report.rejected[pid] = str(cause)
                self.bar.update(1)
            else:
                self.retry(data, f"{type(cause).__name__}: {cause}")
            self.submit(actor)
            return
        self.on_result(result)
        if self.first_result:  # once, while every actor holds the bank
            from xpeft.ray.cluster import object_store_usage

            self.report.memory["object_store"] = object_store_usage()
            self.first_result = False
        self.bar.update(1)
        elapsed = time.perf_counter() - self.start
        failed = len(self.report.failed) + len(self.report.rejected)
        self.bar.set_postfix(failed=failed, per_min=f"{60 * self.bar.n / elapsed:.1f}")
        self.submit(actor)

    def finish(self) -> list[Any]:
        """Record each actor's memory and where it ran; stop those still starting; the others, up and idle."""
        infos = ray.get([a.info.remote() for a in self.ready])
        self.report.memory = {
            **self.report.memory,
            "rss_bytes_per_actor": [i["rss_bytes"] for i in infos],
            "bank_zero_copy": all(i["bank_zero_copy"] for i in infos),
            "nodes": sorted({i["node_id"] for i in infos}),
        }
        for actor in self.starting.values():
            ray.kill(actor)
        return self.ready


class WarmActors:
    """Started actors kept between a driver's pools, by what their processes hold (`key`: the backbone, CPUs,
    GPUs, threads): a pool takes one and reconfigures it (its bank, configs, head) in milliseconds, where a new
    actor costs a process, torch and the backbone (~10 CPU-seconds on this 2-core machine). Idle actors keep their
    CPUs reserved, so `close()` (or the `with` block's end) stops them; `run_farm` closes its own at its end."""

    def __init__(self):
        self.idle: dict[Hashable, list[Any]] = defaultdict(list)

    def take(self, key: Hashable) -> Any | None:
        return self.idle[key].pop() if self.idle[key] else None

    def keep(self, key: Hashable, actors: list[Any]) -> None:
        self.idle[key].extend(actors)

    def stop(self, but: Hashable | None = None) -> None:
        """Stop the idle actors (but those of key `but`): their CPUs go back to the cluster, for other actors or
        a task, which would otherwise wait for them forever."""
        for key in [k for k in self.idle if k != but]:
            for actor in self.idle.pop(key):
                ray.kill(actor)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> WarmActors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
