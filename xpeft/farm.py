"""The profile farm: a pool of Ray actors fits one X-PEFT profile per profile_id against one shared bank.

- The bank is put into the object store once (`ray.put` of its numpy arrays); every actor maps it
  zero-copy (read-only pages shared by all workers of a node), and loads the encoder once, not per profile.
- Profiles are scheduled largest first onto idle actors. An actor that dies has its profile retried on a
  fresh actor (bounded), then recorded as failed with the reason; bad data is rejected with its reason.
- Results are written to the ProfileStore in small atomic batches; a re-run with the same store skips
  every stored profile (resume).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import ray
import torch
from tqdm import tqdm

from xpeft.bank import AdapterBank, load_bank, random_bank
from xpeft.config import TrainConfig, XPeftConfig, check_k, default_k
from xpeft.fitting import (
    BadProfileData,
    ProfileData,
    ProfileFitter,
    adapted_dims,
    bank_from_single_adapters,
    bank_member_profile,
    fit_mtl,
)
from xpeft.store import ProfileStore

log = logging.getLogger(__name__)

Setting = Literal["random", "sa", "mtl"]


@dataclass
class FarmConfig:
    """One farm run. `setting` is §3.1's: a random bank, or a bank learned from the first `warm_start`
    profiles with single_adapter (`sa`) or jointly with a shared head (`mtl`)."""

    store: str
    xpeft: XPeftConfig = field(default_factory=lambda: XPeftConfig(head="linear"))
    train: TrainConfig = field(default_factory=TrainConfig)
    setting: Setting = "random"
    warm_start: float = 150  # profiles (>= 1) or a fraction of them (< 1) for the sa / mtl bank
    warm_train: TrainConfig | None = None  # the warm start's own fit settings (default: `train`)
    bank_path: str | None = None  # an existing bank instead of a random one
    bank_seed: int = 0
    bank_scale: float = 1.0
    backbone: str = "minilm"
    num_actors: int | None = None  # default: the cluster's CPUs // cpus_per_actor (GPUs when used)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_retries: int = 2
    flush_every: int = 8
    label_names: list[str] | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["xpeft"], d["train"] = self.xpeft.to_dict(), self.train.to_dict()
        return d


@dataclass
class RunReport:
    fitted: dict[str, dict] = field(default_factory=dict)  # profile_id -> metrics and timing
    skipped: list[str] = field(default_factory=list)  # already in the store (resume)
    rejected: dict[str, str] = field(default_factory=dict)  # bad data: profile_id -> reason
    failed: dict[str, str] = field(default_factory=dict)  # retries exhausted: profile_id -> reason
    retries: int = 0
    actors: int = 0
    seconds: float = 0.0
    bank: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    warm_start: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Any] = field(default_factory=dict)  # mask type, N, the k used and why

    @property
    def profiles_per_minute(self) -> float:
        return 60 * len(self.fitted) / self.seconds if self.seconds else 0.0


# --- the actor ---------------------------------------------------------------------------------------


def bank_to_object(bank: AdapterBank) -> dict[str, Any]:
    """What goes into the object store: numpy arrays (zero-copy on read) and the metadata."""
    return {"A": bank.A.numpy(), "B": bank.B.numpy(), "meta": bank.metadata()}


def bank_from_object(obj: dict[str, Any]) -> AdapterBank:
    meta = obj["meta"]
    import warnings

    with warnings.catch_warnings():  # the arrays are read-only object-store pages; the bank is frozen
        warnings.simplefilter("ignore", UserWarning)
        A, B = torch.from_numpy(obj["A"]), torch.from_numpy(obj["B"])
    seed = int(meta["seed"]) if meta.get("seed") else None
    return AdapterBank(A, B, meta["target"], seed, meta["source"], meta["fingerprint"])


def object_store_stats() -> dict[str, float]:
    """Ray's own aggregate object-store stats (what `ray memory --stats-only` prints): MiB and objects."""
    import re

    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    return {"plasma_mib": int(m.group(1)), "objects": int(m.group(2))} if m else {"raw": text}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class ProfileWorker:
    """A farm actor's state: the encoder, tokenizer and the shared bank, loaded once."""

    def __init__(
        self,
        backbone: str,
        bank_obj: dict | None,
        xcfg: XPeftConfig,
        tcfg: TrainConfig,
        shared_head: dict | None,
        head_id: str | None,
        label_names: list[str] | None,
        threads: int,
    ):
        from xpeft.model import load_encoder, load_tokenizer

        torch.set_num_threads(max(1, threads))
        self.bank_zero_copy = bank_obj is not None and not bank_obj["A"].flags.writeable
        bank = bank_from_object(bank_obj) if bank_obj is not None else None
        # An actor given a GPU (FarmConfig.gpus_per_actor) fits there; Ray sets CUDA_VISIBLE_DEVICES to it.
        self.device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.fitter = ProfileFitter(
            load_encoder(backbone),
            load_tokenizer(backbone),
            bank,
            xcfg,
            tcfg,
            shared_head,
            head_id,
            label_names,
            device=self.device,
        )

    def fit(self, data: ProfileData) -> dict:
        out = self.fitter.fit(data)
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


def warm_start_cpus(cfg: FarmConfig) -> float:
    """CPUs for the joint warm start, which runs alone before the pool: the largest node's, up to 8 (one
    training loop's threads stop paying off beyond that), and never fewer than an actor's."""
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(cfg.cpus_per_actor, float(min(8, int(max(nodes, default=1)))))


@ray.remote
def warm_start_mtl(
    backbone: str, xcfg: XPeftConfig, tcfg: TrainConfig, datas: list[ProfileData], threads: int
) -> tuple[AdapterBank, dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """§3.1's mtl warm start (`fit_mtl`) as a Ray task: the learned bank, the shared head, the metrics."""
    from xpeft.model import load_encoder, load_tokenizer

    torch.set_num_threads(threads)
    fitter = ProfileFitter(load_encoder(backbone), load_tokenizer(backbone), None, xcfg, tcfg)
    return fit_mtl(fitter, datas)


# --- scheduling --------------------------------------------------------------------------------------


def default_num_actors(cfg: FarmConfig) -> int:
    res = ray.cluster_resources()
    if cfg.gpus_per_actor:
        return max(1, int(res.get("GPU", 0) / cfg.gpus_per_actor))
    return max(1, int(res.get("CPU", 1) / cfg.cpus_per_actor))


def run_pool(
    datas: list[ProfileData],
    make_actor: Callable[[], Any],
    num_actors: int,
    max_retries: int,
    on_result: Callable[[dict], None],
    report: RunReport,
    progress: bool = True,
) -> None:
    """Fit every profile on a pool of actors, largest first. Work goes only to actors that are up (an actor
    the cluster cannot place holds no profile hostage). A dead actor is replaced and its profile retried up
    to `max_retries` times; a profile whose data is bad is rejected at once."""
    queue = sorted(datas, key=lambda d: (-d.size, d.profile_id))
    queue.reverse()  # pop() from the end takes the largest
    attempts: dict[str, int] = {}
    starting: dict[Any, Any] = {}  # readiness ref -> actor still starting
    ready: list[Any] = []
    in_flight: dict[Any, tuple[Any, ProfileData]] = {}
    bar = tqdm(total=len(datas), desc="profiles", unit="profile", disable=not progress)
    measured = False
    start = time.perf_counter()

    def spawn() -> None:
        actor = make_actor()
        starting[actor.__ray_ready__.remote()] = actor

    def submit(actor) -> None:
        if queue:
            data = queue.pop()
            in_flight[actor.fit.remote(data)] = (actor, data)

    def retry(data: ProfileData, reason: str) -> None:
        pid = data.profile_id
        attempts[pid] = attempts.get(pid, 0) + 1
        if attempts[pid] <= max_retries:
            report.retries += 1
            queue.append(data)
        else:
            report.failed[pid] = reason
            bar.update(1)

    for _ in range(min(num_actors, len(queue))):
        spawn()
    report.actors = max(report.actors, len(starting))
    while in_flight or (queue and starting):
        [ref], _ = ray.wait(list(in_flight) + list(starting), num_returns=1)
        if ref in starting:
            actor = starting.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:  # died while starting: try another
                spawn()
                continue
            ready.append(actor)
            submit(actor)
            continue
        actor, data = in_flight.pop(ref)
        pid = data.profile_id
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # the worker died mid-profile: replace it, retry
            log.warning("actor died while fitting %s: %s", pid, type(e).__name__)
            ready.remove(actor)
            retry(data, f"worker died {attempts.get(pid, 0) + 1} times: {type(e).__name__}")
            spawn()
            for idle in [a for a in ready if a not in {v[0] for v in in_flight.values()}]:
                submit(idle)
            continue
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, Exception) else e
            if isinstance(cause, BadProfileData):
                report.rejected[pid] = str(cause)
                bar.update(1)
            else:
                retry(data, f"{type(cause).__name__}: {cause}")
            submit(actor)
            continue
        on_result(result)
        if not measured:  # once, while every actor holds the bank
            report.memory["object_store"] = object_store_stats()
            measured = True
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix(failed=len(report.failed) + len(report.rejected), per_min=f"{60 * bar.n / elapsed:.1f}")
        submit(actor)
    bar.close()
    for data in queue:  # only when no actor could ever start
        report.failed[data.profile_id] = "no actor could be started (not enough resources in the cluster?)"
    infos = ray.get([a.info.remote() for a in ready])
    report.memory = {
        **report.memory,
        "rss_bytes_per_actor": [i["rss_bytes"] for i in infos],
        "bank_zero_copy": all(i["bank_zero_copy"] for i in infos),
        "nodes": sorted({i["node_id"] for i in infos}),
    }
    for actor in ready + list(starting.values()):
        ray.kill(actor)


# --- the run -----------------------------------------------------------------------------------------


def warm_start_count(cfg: FarmConfig, n: int) -> int:
    m = int(round(cfg.warm_start * n)) if cfg.warm_start < 1 else int(cfg.warm_start)
    if not 1 <= m < n:
        raise ValueError(
            f"the {cfg.setting} warm start needs 1 <= M < profiles; got M={m} of {n} profiles "
            f"(set --warm-start to a count below {n} or a fraction)"
        )
    return m


def split_warm(cfg: FarmConfig, datas: list[ProfileData]) -> tuple[list[ProfileData], list[ProfileData]]:
    """The warm-start profiles (a seeded random choice of M, as the paper's 'randomly select 150 authors')
    and the rest, which get masks."""
    ordered = sorted(datas, key=lambda d: d.profile_id)
    order = np.random.default_rng(cfg.train.seed).permutation(len(ordered))
    m = warm_start_count(cfg, len(datas))
    return [ordered[i] for i in order[:m]], [ordered[i] for i in order[m:]]


def run_farm(cfg: FarmConfig, datas: list[ProfileData]) -> RunReport:
    """Fit every profile in `datas` into `cfg.store`; returns the run report (also written to the store)."""
    from xpeft.model import load_encoder

    start = time.perf_counter()
    report = RunReport()
    store = ProfileStore(cfg.store)
    done = set(store.ids())
    ids = [d.profile_id for d in datas]
    if len(set(ids)) != len(ids):
        raise ValueError("profile ids must be unique within a run")
    xcfg, shared_head, head_id = cfg.xpeft, None, None
    buffer: list = []

    def on_result(result: dict) -> None:
        p = result["profile"]
        buffer.append(p)
        report.fitted[p.profile_id] = {
            **p.metrics,
            "seconds": result["seconds"],
            "mode": p.config.mode,
            "record_bytes": p.record_bytes,
            "dropped": result["dropped"],
        }
        if len(buffer) >= cfg.flush_every:
            store.write(buffer)
            buffer.clear()

    def pool(part: list[ProfileData], bank: AdapterBank | None, x: XPeftConfig, t: TrainConfig) -> None:
        todo = [d for d in part if d.profile_id not in done]
        report.skipped += [d.profile_id for d in part if d.profile_id in done]
        if not todo:
            return
        bank_ref = ray.put(bank_to_object(bank)) if bank is not None else None
        threads = max(1, int(cfg.cpus_per_actor))

        def make_actor():
            opts = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor}
            return ProfileActor.options(**opts).remote(
                cfg.backbone, bank_ref, x, t, shared_head, head_id, cfg.label_names, threads
            )

        run_pool(
            todo,
            make_actor,
            cfg.num_actors or default_num_actors(cfg),
            cfg.max_retries,
            on_result,
            report,
            cfg.progress,
        )
        store.write(buffer)
        buffer.clear()

    bank: AdapterBank | None = None
    rest = datas
    if xcfg.mode == "x_peft" and cfg.setting in ("sa", "mtl"):
        warm, rest = split_warm(cfg, datas)
        # Before any fit: the learned bank will have N = len(warm), and its warm-start profiles are stored as
        # one-hot hard masks over it (k = 1 of N), so even soft runs need N >= 2.
        check_learned_bank_k(xcfg if xcfg.mask_type == "hard" else replace(xcfg, k=1), len(warm), cfg.setting)
        warm_t = cfg.warm_train or cfg.train
        state = load_state(store)
        if cfg.setting == "sa":
            pool(warm, None, replace(xcfg, mode="single_adapter"), warm_t)
            warm_profiles = [store.get(d.profile_id) for d in warm if d.profile_id in store]
            bank = bank_from_single_adapters(warm_profiles, xcfg.target)
            report.warm_start = {"setting": "sa", "profiles": len(warm_profiles)}
        elif state.get("setting") == "mtl" and state.get("bank"):  # resume: the joint warm start is done
            bank = store.load_bank(state["bank"])
            head_id = state["head_id"]
            shared_head = store.load_head(head_id)
            report.warm_start = {"setting": "mtl", "profiles": len(warm), "resumed": True}
        else:
            t0 = time.perf_counter()
            # On a worker like any fit (the driver may sit on a head node with no CPUs to spare), retried
            # like an actor's profile if its worker dies.
            cpus = warm_start_cpus(cfg)
            task = warm_start_mtl.options(num_cpus=cpus, max_retries=cfg.max_retries)
            warm_sa = replace(xcfg, mode="single_adapter")
            bank, shared_head, warm_metrics = ray.get(task.remote(cfg.backbone, warm_sa, warm_t, warm, int(cpus)))
            head_id = f"mtl-{bank.fingerprint[:16]}"
            store.save_head(head_id, shared_head)
            # The warm-start profiles are profiles too: each is served by its own member of the bank.
            store.write(
                [
                    bank_member_profile(
                        bank, m, xcfg, d.profile_id, warm_metrics.get(d.profile_id), head_id, cfg.label_names
                    )
                    for m, d in enumerate(warm)
                ]
            )
            report.warm_start = {
                "setting": "mtl",
                "profiles": len(warm),
                "seconds": time.perf_counter() - t0,
                "metrics": warm_metrics,
            }
        store.save_bank(bank)
        save_state(store, {"setting": cfg.setting, "bank": bank.fingerprint, "head_id": head_id})
        xcfg = replace(xcfg, N=bank.N, b=bank.b)
    elif xcfg.mode == "x_peft":
        if cfg.bank_path:
            bank = load_bank(cfg.bank_path)
        else:
            L, d_in, d_out = adapted_dims(load_encoder(cfg.backbone), xcfg.target)
            bank = random_bank(L, xcfg.N, xcfg.b, d_in, d_out, cfg.bank_seed, xcfg.target, cfg.bank_scale)
        store.save_bank(bank)
    if bank is not None:
        report.bank = {**bank.metadata(), "nbytes": bank.nbytes}
    if xcfg.mode == "x_peft":
        xcfg, report.masks = resolve_k(xcfg, bank, cfg.setting)
    pool(rest, bank, xcfg, cfg.train)
    report.seconds = time.perf_counter() - start
    return report


def check_learned_bank_k(xcfg: XPeftConfig, M: int, setting: str) -> None:
    """The sa / mtl bank has one adapter per warm-start profile (N = M): refuse a k it cannot select a proper
    subset of now, rather than after the warm start has run."""
    try:
        check_k(xcfg.k if xcfg.k is not None else default_k(M), M)
    except ValueError as e:
        raise ValueError(
            f"the {setting} warm start makes a bank of N={M} adapters (one per warm-start profile): {e}; "
            "or raise --warm-start"
        ) from None


def resolve_k(xcfg: XPeftConfig, bank: AdapterBank | None, setting: str) -> tuple[XPeftConfig, dict[str, Any]]:
    """The mask config the profiles are fitted with, k made explicit, and what the report says about it."""
    N = bank.N if bank is not None else xcfg.N
    if xcfg.mask_type == "soft":
        return replace(xcfg, N=N), {"mask_type": "soft", "N": N, "k": None, "why": "soft masks weigh all N"}
    k = xcfg.top_k if xcfg.k is not None else default_k(N)
    check_k(k, N)
    learned = f"the {setting} bank learned from {N} warm-start profiles" if setting in ("sa", "mtl") else None
    why = (
        f"given (--k {k})"
        if xcfg.k is not None
        else f"half of N={N} ({learned or 'the random bank'}), the paper's ratio k = 50 of N = 100; set --k to choose"
    )
    return replace(xcfg, N=N, k=k), {"mask_type": "hard", "N": N, "k": k, "why": why}


def load_state(store: ProfileStore) -> dict:
    path = f"{store.root}/farm_state.json"
    try:
        with store.fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return {}


def save_state(store: ProfileStore, state: dict) -> None:
    blob = json.dumps(state).encode()
    store._atomic_write(f"{store.root}/farm_state.json", lambda out: out.write(blob))
