"""The profile farm: a pool of Ray actors fits one X-PEFT profile per profile_id against one shared bank.

- The bank is put into the object store once (`ray.put` of its numpy arrays); every actor maps it
  zero-copy (read-only pages shared by all workers of a node), and loads the encoder once, not per profile.
- Profiles are scheduled largest first onto idle actors (xpeft.ray.pool): an actor that dies has its
  profile retried on a fresh actor (bounded), then recorded as failed with the reason; bad data is rejected
  with its reason.
- Results are upserted into the ProfileStore in small batches (one commit each, safe beside other writers);
  a re-run with the same store skips every stored profile (resume), and the sa / mtl warm start's outcome is
  kept in the store's run state. A bank is verified against its fingerprint whenever it is loaded.
- New profiles are fitted on the newest bank of the store's lineage (a bank grown from the run's, issue 26),
  or on the one `bank_fingerprint` pins; a random bank is drawn only for a store that holds none.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import ray
import torch

from xpeft.config import RandomBankFields, TrainConfig, XPeftConfig, check_k, default_k, option
from xpeft.core.bank import AdapterBank, bank_to_object, load_bank, random_bank_for
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.data.dataset import ProfileData
from xpeft.fit.on_demand import FitRecipe, save_recipe
from xpeft.fit.profile import ProfileFitter
from xpeft.fit.warm_start import bank_from_single_adapters, bank_member_profile, fit_mtl
from xpeft.profiles.lineage import Lineages
from xpeft.profiles.store import ProfileStore
from xpeft.ray.pool import FarmPool, ProfileActor, WarmActors

log = logging.getLogger(__name__)

Setting = Literal["random", "sa", "mtl"]
STATE = "farm"  # the store's run state `state/farm.json`: the learned bank and shared head of a warm start


@dataclass
class FarmConfig(RandomBankFields):
    """One farm run. `setting` is §3.1's: a random bank, or a bank learned from the first `warm_start`
    profiles with single_adapter (`sa`) or jointly with a shared head (`mtl`)."""

    store: str = option(help="the profile store: a directory or a URI (s3://…)")
    bank_fingerprint: str | None = option(
        None,
        "fit on this bank of the store (its fingerprint, or a unique prefix); default: the newest bank of the "
        "store's lineage (a random bank is drawn only for a store that holds none)",
    )
    refit: list[str] = option(
        factory=list,
        help="profile ids stored on an older bank to fit again on the bank this run fits on (the newest, or the "
        "pinned one); resumable: a profile already on that bank is skipped",
    )
    refit_older_than: str | None = option(
        None,
        "fit again every stored profile fitted on a bank older than this one (a fingerprint or prefix): one it "
        "was grown from",
    )
    xpeft: XPeftConfig = option(XPeftConfig(head="linear"), "the profiles' mode, masks and head", no_flag=True)
    train: TrainConfig = option(TrainConfig(), "each profile's fit", no_flag=True)
    setting: Setting = option("random", "the bank (§3.1): random, or learned by an sa / mtl warm start")
    warm_start: float = option(
        0.45, "warm-start profiles for the sa / mtl bank: a count (>= 1) or a fraction (the paper: 150 of 323 authors)"
    )
    warm_train: TrainConfig | None = option(None, "the warm start's own fit (default: train)", no_flag=True)
    num_actors: int | None = option(None, "actors (default: the cluster's CPUs / --cpus-per-actor, or its GPUs)")
    cpus_per_actor: float = option(1.0, "CPUs (torch threads) per actor")
    gpus_per_actor: float = option(0.0, "> 0: each actor fits on the GPU Ray gives it (0.25: 4 actors a GPU)")
    max_retries: int = option(2, "times a profile whose actor died is retried")
    flush_every: int = option(8, "profiles per store write", no_flag=True)
    label_names: list[str] | None = option(None, "the classes' names (from the data set)", no_flag=True)
    progress: bool = option(True, "a progress bar")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    torch.set_num_threads(threads)
    fitter = ProfileFitter(load_encoder(backbone), load_tokenizer(backbone), None, xcfg, tcfg)
    return fit_mtl(fitter, datas)


def default_num_actors(cfg: FarmConfig) -> int:
    res = ray.cluster_resources()
    if cfg.gpus_per_actor:
        return max(1, int(res.get("GPU", 0) / cfg.gpus_per_actor))
    return max(1, int(res.get("CPU", 1) / cfg.cpus_per_actor))


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


class Farm:
    """One run of `run_farm`: the store, the report, the profiles already stored, the write buffer."""

    def __init__(self, cfg: FarmConfig, datas: list[ProfileData], actors: WarmActors | None = None):
        ids = [d.profile_id for d in datas]
        if len(set(ids)) != len(ids):
            raise ValueError("profile ids must be unique within a run")
        self.cfg, self.datas = cfg, datas
        self.own_actors = actors is None  # then run() stops the actors when it ends
        self.actors = actors if actors is not None else WarmActors()
        self.store = ProfileStore(cfg.store)
        self.report = RunReport()
        self.buffer: list = []
        self.shared_head: dict[str, torch.Tensor] | None = None
        self.head_id: str | None = None
        self.on_bank: dict[str, str | None] | None = None  # refitting: each stored profile's bank

    def on_result(self, result: dict) -> None:
        p = result["profile"]
        self.buffer.append(p)
        self.report.fitted[p.profile_id] = {
            **p.metrics,
            "seconds": result["seconds"],
            "mode": p.config.mode,
            "record_bytes": p.record_bytes,
            "dropped": result["dropped"],
        }
        if len(self.buffer) >= self.cfg.flush_every:
            self.flush()

    def flush(self) -> None:
        self.store.write(self.buffer)
        self.buffer.clear()

    def pool(self, part: list[ProfileData], bank: AdapterBank | None, x: XPeftConfig, t: TrainConfig) -> None:
        """Fit the profiles of `part` not stored yet on a pool of actors holding `bank`."""
        cfg = self.cfg
        stored = {d.profile_id for d in part if d.profile_id in self.store}  # index lookups: nothing is read
        if self.on_bank is not None and bank is not None:  # refitting: done once it is on this run's bank
            stored = {pid for pid in stored if self.on_bank.get(pid) == bank.fingerprint}
        todo = [d for d in part if d.profile_id not in stored]
        self.report.skipped += [d.profile_id for d in part if d.profile_id in stored]
        if not todo:
            return
        bank_ref = ray.put(bank_to_object(bank)) if bank is not None else None
        threads = max(1, int(cfg.cpus_per_actor))
        key = (cfg.backbone, cfg.cpus_per_actor, cfg.gpus_per_actor, threads)  # what an actor's process holds
        config = (bank_ref, x, t, self.shared_head, self.head_id, cfg.label_names)

        self.actors.stop(but=key)  # kept actors of another kind would hold CPUs this pool's new ones need

        def start_actor():
            actor = self.actors.take(key)
            if actor is not None:  # kept from an earlier pool: its process and backbone are up
                return actor, actor.configure.remote(*config)
            opts = {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor}
            actor = ProfileActor.options(**opts).remote(cfg.backbone, threads, *config)
            return actor, actor.ready.remote()

        pool = FarmPool(start_actor, cfg.max_retries, self.on_result, self.report, cfg.progress)
        self.actors.keep(key, pool.run(todo, cfg.num_actors or default_num_actors(cfg)))
        self.flush()

    def sa_bank(self, warm: list[ProfileData], xcfg: XPeftConfig) -> AdapterBank:
        self.pool(warm, None, replace(xcfg, mode="single_adapter"), self.cfg.warm_train or self.cfg.train)
        warm_profiles = [self.store.get(d.profile_id) for d in warm if d.profile_id in self.store]
        self.report.warm_start = {"setting": "sa", "profiles": len(warm_profiles)}
        return bank_from_single_adapters(warm_profiles, xcfg.target)

    def mtl_bank(self, warm: list[ProfileData], xcfg: XPeftConfig) -> AdapterBank:
        cfg, state = self.cfg, self.store.read_state(STATE)
        if state.get("setting") == "mtl" and state.get("bank"):  # resume: the joint warm start is done
            self.head_id = state["head_id"]
            self.shared_head = self.store.load_head(self.head_id)
            self.report.warm_start = {"setting": "mtl", "profiles": len(warm), "resumed": True}
            return self.store.load_bank(state["bank"])
        t0 = time.perf_counter()
        # On a worker like any fit (the driver may sit on a head node with no CPUs to spare), retried like an
        # actor's profile if its worker dies.
        cpus = warm_start_cpus(cfg)
        self.actors.stop()  # kept actors would hold the CPUs it needs
        task = warm_start_mtl.options(num_cpus=cpus, max_retries=cfg.max_retries)
        warm_sa, warm_t = replace(xcfg, mode="single_adapter"), cfg.warm_train or cfg.train
        bank, self.shared_head, metrics = ray.get(task.remote(cfg.backbone, warm_sa, warm_t, warm, int(cpus)))
        self.head_id = f"mtl-{bank.fingerprint[:16]}"
        self.store.save_head(self.head_id, self.shared_head)
        # The warm-start profiles are profiles too: each is served by its own member of the bank.
        self.store.write(
            [
                bank_member_profile(
                    bank,
                    m,
                    xcfg,
                    d.profile_id,
                    metrics.get(d.profile_id),
                    self.head_id,
                    cfg.label_names,
                    text_pair=d.text_pair,
                )
                for m, d in enumerate(warm)
            ]
        )
        self.report.warm_start = {"setting": "mtl", "profiles": len(warm), "seconds": time.perf_counter() - t0}
        self.report.warm_start["metrics"] = metrics
        return bank

    def bank(self) -> tuple[AdapterBank | None, list[ProfileData]]:
        """The bank the mask profiles use, and those profiles (all but the warm start's)."""
        cfg, xcfg = self.cfg, self.cfg.xpeft
        if xcfg.mode != "x_peft":
            return None, self.datas
        if cfg.setting in ("sa", "mtl"):
            warm, rest = split_warm(cfg, self.datas)
            # Before any fit: the learned bank will have N = len(warm), and its warm-start profiles are stored
            # as one-hot hard masks over it (k = 1 of N), so even soft runs need N >= 2.
            check_learned_bank_k(xcfg if xcfg.mask_type == "hard" else replace(xcfg, k=1), len(warm), cfg.setting)
            bank = self.sa_bank(warm, xcfg) if cfg.setting == "sa" else self.mtl_bank(warm, xcfg)
            self.store.save_bank(bank)
            self.store.write_state(STATE, {"setting": cfg.setting, "bank": bank.fingerprint, "head_id": self.head_id})
            return self.newest(bank), rest
        if cfg.bank_path and cfg.bank_fingerprint:
            raise ValueError("give one bank: bank_path (--bank-path, a file) or bank_fingerprint (one of the store's)")
        if cfg.bank_path:
            bank = load_bank(cfg.bank_path)
        elif cfg.bank_fingerprint or self.store.bank_fingerprints():
            return self.newest(None), self.datas
        else:
            bank = random_bank_for(load_encoder(cfg.backbone), xcfg, cfg.bank_seed, cfg.bank_scale)
        self.store.save_bank(bank)
        return bank, self.datas

    def to_refit(self, rest: list[ProfileData]) -> list[ProfileData]:
        """The profiles of `rest` chosen by cfg.refit / cfg.refit_older_than (a ValueError naming the ones the
        data set lacks); remembers each stored profile's bank, so a resumed refit skips those already moved."""
        table = self.store.read_table(columns=["profile_id", "bank_fingerprint"]).to_pylist()
        self.on_bank = {r["profile_id"]: r["bank_fingerprint"] for r in table}
        ids = set(self.cfg.refit)
        if self.cfg.refit_older_than:
            lineages = Lineages.of(self.store)
            upto = lineages.find(self.cfg.refit_older_than)
            ids |= {pid for pid, fp in self.on_bank.items() if fp in lineages.older_than(upto)}
        have = {d.profile_id for d in rest}
        missing = sorted(pid for pid in ids if pid not in have and pid in set(self.cfg.refit))
        if missing:
            raise ValueError(f"cannot refit {missing}: the data set has no rows for them (or they are warm-start "
                             "profiles, which are their bank's own members)")  # fmt: skip
        return [d for d in rest if d.profile_id in ids]

    def newest(self, learned: AdapterBank | None) -> AdapterBank:
        """The bank new profiles are fitted on: the one cfg.bank_fingerprint pins, else the newest bank of the
        store grown from `learned` (`learned` itself when none was), else (no learned bank) the store's newest."""
        lineages = Lineages.of(self.store)
        if self.cfg.bank_fingerprint:
            fp = lineages.find(self.cfg.bank_fingerprint)
        elif learned is not None:
            fp = lineages.candidates(learned.fingerprint)[0]
        else:
            fp = lineages.the_newest()
        bank = learned if learned is not None and fp == learned.fingerprint else self.store.load_bank(fp)
        if self.head_id is not None and learned is not None and bank.members_of(learned.fingerprint) is None:
            raise ValueError(
                f"bank {fp[:12]}… was not grown from the mtl bank {learned.fingerprint[:12]}… whose shared head "
                f"{self.head_id} the profiles use; pin a bank of its lineage, or fit into another store"
            )
        return bank

    def run(self) -> RunReport:
        try:
            return self.fit_all()
        finally:
            if self.own_actors:
                self.actors.close()

    def fit_all(self) -> RunReport:
        start = time.perf_counter()
        xcfg = self.cfg.xpeft
        bank, rest = self.bank()
        if self.cfg.refit or self.cfg.refit_older_than:
            rest = self.to_refit(rest)
        if bank is not None:
            self.report.bank = {**bank.metadata(), "nbytes": bank.nbytes}
            xcfg, self.report.masks = resolve_k(replace(xcfg, b=bank.b), bank, self.cfg.setting)
        save_recipe(self.store, FitRecipe.of(self.cfg, xcfg, bank, self.head_id))
        self.pool(rest, bank, xcfg, self.cfg.train)
        self.report.seconds = time.perf_counter() - start
        return self.report


def run_farm(cfg: FarmConfig, datas: list[ProfileData], actors: WarmActors | None = None) -> RunReport:
    """Fit every profile in `datas` into `cfg.store`; returns the run report. Its actors serve every pool of the
    run (an sa warm start's, then the masks'); given `actors`, they are kept there for the driver's next run
    (whoever made `actors` closes it, as they hold their CPUs), else stopped at the end."""
    return Farm(cfg, datas, actors).run()
