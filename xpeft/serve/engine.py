"""The serving engine: everything one replica does, with torch only (no Ray, no HTTP), so batch scoring and
tests reuse it in one process.

A replica loads the backbone, the tokenizer and a bank once, and opens the store: the profile table's id
index is built from its id column alone, so a replica is ready without reading any profile. A profile is not a
model of its own (that would split batches per profile): a request names it, its stored record is combined with
the bank once (Â, B̂ per block) into an LRU cache of `CombinedProfile`s. Stored records are small (mask bits,
LN, head), so a second, byte-bounded cache (`RecordCache`) keeps as many as `record_cache_mb` allows (filled
on reads and, optionally, in the background at start): a request to any of them skips the store and pays only
for the contraction. Both caches answer only for the stored version they were filled from. `forward` runs rows
of any profiles as one forward (`xpeft.serve.forward`: per-row adapters, one encoder pass, every head at once).

A background refresher moves the replica to the store's latest version every `staleness_s`: new profiles are
found, a refit one is served in its new version, a deleted one is a 404. An unknown id is answered from the
index (no listing, no scan). A profile in a damaged part of the store fails alone (503 naming the part), and
`health()` reports the replica "degraded" with the reason.

Every bank of the store is served (`xpeft.serve.banks.ServedBanks`, issue 26): a profile is combined with the
newest bank grown from its own (its masks zero-extended), a bank of another lineage is loaded on first use into a
byte-bounded cache, and a profile whose bank is not in the store is refused with 409 naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from xpeft.config import DEFAULT_TARGET
from xpeft.core.bank import AdapterBank
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import bank_misfit
from xpeft.core.multiprofile import CombinedProfile, MultiProfileModel
from xpeft.data.tokens import Collator, tokenize
from xpeft.profiles.record import Profile, compatibility, model_dims, summary
from xpeft.profiles.store import Location, ProfileStore
from xpeft.serve.banks import ServedBanks
from xpeft.serve.cache import ProfileCache
from xpeft.serve.combine import combine_profiles
from xpeft.serve.config import ServeConfig
from xpeft.serve.forward import make_forward, token_inputs
from xpeft.serve.view import ServeError, StoreView, not_found, rss_bytes

__all__ = ["ProfileEngine", "ServeError", "not_found", "predictions", "serving_bank"]

log = logging.getLogger(__name__)


class ProfileEngine:
    """Backbone + tokenizer + bank + the store's view + caches of one replica. Blocking methods; the deployment
    calls them from worker threads so the replica's event loop keeps gathering requests. `start()` starts the
    background refresher (and preload); without it the view moves only on `view.refresh()`."""

    def __init__(self, cfg: ServeConfig, step=lambda what: None):
        """`step(what)` is told what the engine loads next (a replica's /healthz says it while it starts)."""
        self.cfg = cfg
        threads = cfg.torch_threads or max(1, int(cfg.cpus_per_actor))
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if cfg.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        step(f"the store's id index ({cfg.store})")
        self.view = StoreView(cfg)
        self.store = self.view.store
        step("the bank, verified against its fingerprint")
        self.banks = ServedBanks(cfg, self.store)
        bank = self.banks.start(self.device)  # the bank it starts with; the others on first use
        self.bank_fingerprint = bank.fingerprint if bank is not None else None
        self.view.on_refresh.append(self.banks.refresh)
        step(f"the backbone {cfg.backbone}")
        encoder = load_encoder(cfg.backbone)
        self.tokenizer = load_tokenizer(cfg.backbone)
        self.collate = Collator(self.tokenizer.pad_token_id or 0)
        self.model = MultiProfileModel(encoder, bank.target if bank else DEFAULT_TARGET)
        self.dims = model_dims(self.model)
        self.d = self.dims.d
        misfit = bank_misfit(bank, encoder, self.model.target) if bank is not None else []
        if misfit:
            raise ValueError(
                f"{bank.describe()} does not fit backbone {cfg.backbone!r}: {'; '.join(misfit)}; serve the "
                "backbone the bank was made for"
            )
        if self.device.type != "cpu":
            self.model.to(self.device)
        # ONNX Runtime on CPU (the graph exported once per backbone, or found in cfg.onnx_cache), or torch eager.
        step(f"the encoder's forward ({cfg.forward}: an ONNX graph is exported once per backbone, then found)")
        self.forward_rows = make_forward(
            cfg.forward, self.model, self.device, token_inputs(self.tokenizer, encoder), threads, cfg.onnx_cache,
            bank.b if bank is not None else None,
        )  # fmt: skip
        self.cache = ProfileCache(cfg.cache_size)
        self.records = self.view.records
        self._forward_lock = threading.Lock()  # one forward at a time (eager: it sets adapters on shared modules)
        # Since start, for /healthz: forwards, rows, profiles read and combined, and seconds spent on each.
        self.stats = {
            "batches": 0,
            "rows": 0,
            "max_profiles_in_batch": 0,
            "forward_seconds": 0.0,
            "forward": self.forward_rows.name,
            "forward_by_rows": {},  # rows of a forward -> [forwards, seconds]: what the replica's batches cost
            "profiles_loaded": 0,
            "load_seconds": 0.0,
        }
        log.info(
            "profile server ready: backbone %s, %s, store %s (%d profiles)",
            cfg.backbone,
            bank.describe() if bank else "no bank (x_peft profiles refused)",
            cfg.store,
            self.view.profiles_at_start,
        )

    def start(self) -> None:
        """Keep up with the store in the background (and preload the record cache when configured)."""
        self.view.start()

    def close(self) -> None:
        self.view.close()

    # --- profiles ---

    @property
    def bank(self) -> AdapterBank | None:
        """The bank used last (the start's until another is used); the cache bounds what else is held."""
        return self.banks.last()

    def bank_for(self, p: Profile) -> AdapterBank | None:
        """The bank that combines `p` (None for a profile that needs none): ServeError 409 when its bank is not in
        the store, 503 when it is damaged, each naming it."""
        return self.banks.bank_for(p) if p.config.mode == "x_peft" else None

    def problem(self, p: Profile) -> str | None:
        """Why this server cannot serve `p` (None: it can)."""
        try:
            return compatibility(p, self.bank_for(p), self.dims)
        except ServeError as e:
            return e.detail

    def _on_device(self, c: CombinedProfile) -> CombinedProfile:
        if self.device.type == "cpu":
            return c
        names = ("A_hat", "B_hat", "ln_weight", "ln_bias")
        moved = {n: getattr(c, n).to(self.device) for n in names if getattr(c, n) is not None}
        return dataclasses.replace(c, head=c.head.to(self.device), **moved)

    def cached(self, profile_id: str) -> CombinedProfile | None:
        """The combined profile of the served version, if it is in the cache (no store read)."""
        try:
            return self.cache.get(self.view.locate(profile_id), profile_id)
        except ServeError:
            return None

    def _prepare(
        self, pid: str, heads: dict
    ) -> tuple[Location, Profile, AdapterBank | None] | CombinedProfile | ServeError:
        """A cached combination, or the record to combine and its bank (its shared head into `heads`), or the
        refusal."""
        try:
            loc = self.view.locate(pid)
            cached = self.cache.get(loc, pid)
            if cached is not None:
                return cached
            loc, p = self.view.record(pid)
            bank = self.bank_for(p)  # 409 when its bank is not in the store, 503 when damaged
            problem = compatibility(p, bank, self.dims)
            if problem is not None:
                return ServeError(409, problem)
            if p.head_id is not None:
                heads[p.head_id] = self.view.shared_head(p.head_id, pid)  # 503 when damaged, 409 when missing
        except ServeError as e:
            return e
        return loc, p, bank

    def load_profiles(self, profile_ids: list[str]) -> list[CombinedProfile | ServeError]:
        """Read, check and combine the served versions of profiles that are not cached; cache and return them
        (or each one's refusal: one profile's problem never fails the others)."""
        start = time.perf_counter()
        found: dict[str, CombinedProfile | ServeError] = {}
        by_bank: dict[str | None, tuple[AdapterBank | None, list[tuple[Location, Profile]]]] = {}
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for pid in dict.fromkeys(profile_ids):
            got = self._prepare(pid, heads)
            if isinstance(got, tuple):
                loc, p, bank = got
                by_bank.setdefault(bank.fingerprint if bank else None, (bank, []))[1].append((loc, p))
            else:
                found[pid] = got
        for bank, todo in by_bank.values():  # one contraction per bank (in practice one: the newest)
            combined = combine_profiles([p for _, p in todo], bank, self.d, heads)
            for (loc, p), c in zip(todo, combined, strict=True):
                if isinstance(c, Exception):
                    found[p.profile_id] = ServeError(409, str(c))
                else:
                    c = self._on_device(c)
                    self.cache.put(loc, c)
                    found[p.profile_id] = c
            self.stats["profiles_loaded"] += len(todo)
        self.stats["load_seconds"] += time.perf_counter() - start
        return [found[pid] for pid in profile_ids]

    def preload_records(self) -> int:
        """Fill the record cache from the store now (what `start` does in the background with cfg.preload)."""
        return self.view.preload_records()

    @property
    def preloading(self) -> bool:
        return self.view.preloading

    def profile_info(self, profile_id: str) -> dict[str, Any]:
        _, p = self.view.record(profile_id)
        problem = self.problem(p) or self.view.damaged_heads.get(p.head_id or "")
        served = self.banks.serves(p)[0] if p.config.mode == "x_peft" else None
        return {**summary(p), "served_from_bank": served, "servable": problem is None, "problem": problem}

    def profile_page(self, offset: int, limit: int) -> dict[str, Any]:
        """A page of the listing; a profile that cannot be read is listed under "unreadable" with the reason."""
        total, ids = self.view.page(offset, limit)
        profiles, unreadable = [], []
        for pid in ids:
            try:
                profiles.append(self.profile_info(pid))
            except ServeError as e:
                if e.status != 404:  # 404: deleted since the page's ids were taken
                    unreadable.append({"profile_id": pid, "detail": e.detail})
        parts = [
            {"part": part, "files": d["files"], "profiles": d["profiles"], "detail": d["error"]}
            for part, d in self.store.damaged().items()
            if not d["listed"]
        ]
        return {"total": total, "offset": offset, "limit": limit, "profiles": profiles, "unreadable": unreadable,
                "unreadable_parts": parts}  # fmt: skip

    def health(self) -> dict[str, Any]:
        """What /healthz reports: "ok" or "degraded" (with the problems), the store, caches, memory, counters."""
        problems = self.view.problems() + self.banks.problems()
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "backbone": self.cfg.backbone,
            "bank_fingerprint": self.bank_fingerprint,
            "banks": self.banks.health(),
            "bank_bytes_in_memory": self.banks.nbytes,
            "cached_profiles": len(self.cache),
            "cache_size": self.cfg.cache_size,
            "rss_bytes": rss_bytes(),
            **self.view.health(),
            **self.stats,
        }

    # --- rows ---

    def tokenize(self, texts: list[str], text_pairs: list[str] | None) -> list[dict]:
        pairs = text_pairs or [None] * len(texts)
        return tokenize(
            [{"text": t, "text_pair": q} for t, q in zip(texts, pairs, strict=True)],
            self.tokenizer,
            self.cfg.max_length,
        )

    @torch.no_grad()
    def forward(self, items: list[tuple[CombinedProfile, dict]]) -> list[torch.Tensor]:
        """Logits for rows of any profiles: one forward (`xpeft.serve.forward`) per adapter width b present (in
        practice one; rows of different b cannot share a batched matmul; head_only rows join any)."""
        by_b: dict[int, list[int]] = {}
        for i, (c, _) in enumerate(items):
            by_b.setdefault(c.b or -1, []).append(i)
        if -1 in by_b and len(by_b) > 1:
            head_only = by_b.pop(-1)
            by_b[next(iter(by_b))] += head_only
        logits: list[torch.Tensor | None] = [None] * len(items)
        with self._forward_lock:
            start = time.perf_counter()
            for idx in by_b.values():
                batch = {k: v.to(self.device) for k, v in self.collate([items[i][1] for i in idx]).items()}
                for i, out in zip(idx, self.forward_rows(batch, [items[i][0] for i in idx]), strict=True):
                    # (a check, not an op per row: beside busy event loops each torch op can wait for the GIL)
                    logits[i] = out if out.device.type == "cpu" and out.dtype == torch.float32 else out.float().cpu()
            seconds = time.perf_counter() - start
            stats = self.stats
            stats["batches"] += 1
            stats["rows"] += len(items)
            stats["max_profiles_in_batch"] = max(stats["max_profiles_in_batch"], len({c.profile_id for c, _ in items}))
            stats["forward_seconds"] += seconds
            n, total = stats["forward_by_rows"].get(str(len(items)), (0, 0.0))
            # a new dict, not an update in place: /healthz may be serializing the old one in another thread
            stats["forward_by_rows"] = {**stats["forward_by_rows"], str(len(items)): (n + 1, total + seconds)}
        return logits  # type: ignore[return-value]


def serving_bank(cfg: ServeConfig, store: ProfileStore) -> AdapterBank | None:
    """The bank a server for `cfg` starts with (`cfg.bank_path`, the one `cfg.bank_fingerprint` names, else the
    store's newest), verified against its fingerprint and lineage: a damaged file is refused, naming it."""
    return ServedBanks(cfg, store).start(torch.device("cpu"))


def predictions(c: CombinedProfile, logits: list[torch.Tensor]) -> list[dict[str, Any]]:
    if c.problem_type == "regression":
        return [{"value": float(z[0])} for z in logits]
    out = []
    for z in logits:
        probs = torch.softmax(z, dim=-1)
        label = int(probs.argmax())
        name = c.label_names[label] if c.label_names and label < len(c.label_names) else None
        out.append({"label": label, "label_name": name, "probabilities": probs.tolist()})
    return out
