"""The serving engine: everything one replica does, with torch only (no Ray, no HTTP), so batch scoring and
tests reuse it in one process.

A replica loads the backbone, the tokenizer and the bank once. A profile is not a model of its own (that
would split batches per profile): a request names it, its stored record (`ProfileStore`, safetensors and
Parquet, no pickle) is combined with the bank once (Â, B̂ per block) into an LRU cache of
`CombinedProfile`s. Stored records are small (mask bits, LN, head), so a second, byte-bounded cache
(`RecordCache`) holds as many as `record_cache_mb` allows, filled in the background at start: a request to
any of them skips the store and pays only for the contraction. `forward` runs rows of any profiles as one
`MultiProfileModel.forward_mixed` call (per-row adapters, one encoder pass). A profile fitted after the
server started is found on its first request (the store re-lists its files when an id is unknown); a profile
rewritten in the store is served in its new version once it leaves the combined cache.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from xpeft.config import DEFAULT_TARGET
from xpeft.core.bank import AdapterBank, load_bank
from xpeft.core.encoder import load_encoder, load_tokenizer
from xpeft.core.model import bank_misfit
from xpeft.core.multiprofile import CombinedProfile, MultiProfileModel
from xpeft.fit.loop import Collator, tokenize
from xpeft.profiles.record import Profile, compatibility, model_dims, summary
from xpeft.profiles.store import Location, ProfileStore
from xpeft.serve.cache import ProfileCache, RecordCache
from xpeft.serve.combine import combine_profiles
from xpeft.serve.config import ServeConfig
from xpeft.serve.forward import make_forward, token_inputs

log = logging.getLogger(__name__)


class ServeError(Exception):
    """A refusal with its HTTP status; the message is for the user."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ProfileEngine:
    """Backbone + tokenizer + bank + store + cache of one replica. Blocking methods; the deployment calls
    them from worker threads so the replica's event loop keeps gathering requests."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.store = ProfileStore(cfg.store)
        self._store_lock = threading.Lock()  # lookups here: the shared-head dict, a record's read-then-keep
        self.bank = self._load_bank()
        encoder = load_encoder(cfg.backbone)
        self.tokenizer = load_tokenizer(cfg.backbone)
        self.collate = Collator(self.tokenizer.pad_token_id or 0)
        self.model = MultiProfileModel(encoder, self.bank.target if self.bank else DEFAULT_TARGET)
        self.dims = model_dims(self.model)
        self.d = self.dims.d
        misfit = bank_misfit(self.bank, encoder, self.model.target) if self.bank is not None else []
        if misfit:
            raise ValueError(
                f"{self.bank.describe()} does not fit backbone {cfg.backbone!r}: {'; '.join(misfit)}; serve the "
                "backbone the bank was made for"
            )
        if self.device.type != "cpu":
            self.model.to(self.device)
            if self.bank is not None:
                self.bank = self.bank.to(self.device)
        # ONNX Runtime on CPU (the graph exported once per backbone, or found in cfg.onnx_cache), or torch eager.
        self.forward_rows = make_forward(
            cfg.forward, self.model, self.device, token_inputs(self.tokenizer), threads, cfg.onnx_cache,
            self.bank.b if self.bank is not None else None,
        )  # fmt: skip
        self.cache = ProfileCache(cfg.cache_size)
        self.records = RecordCache(int(cfg.record_cache_mb * 2**20))
        self.preloading = False  # True while preload_records fills the record cache
        self._forward_lock = threading.Lock()  # one forward at a time (eager: it sets adapters on shared modules)
        self._heads: dict[str, dict[str, torch.Tensor]] = {}  # shared heads (mtl): few, kept for good
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
            "store_reads": 0,
        }
        log.info(
            "profile server ready: backbone %s, %s, store %s",
            cfg.backbone,
            self.bank.describe() if self.bank else "no bank (x_peft profiles refused)",
            cfg.store,
        )

    def _load_bank(self) -> AdapterBank | None:
        cfg = self.cfg
        if cfg.bank_path:
            return load_bank(cfg.bank_path)
        stored = self.store.bank_fingerprints()
        wanted = [fp for fp in stored if fp.startswith(cfg.bank_fingerprint or "")]
        if cfg.bank_fingerprint and len(wanted) != 1:
            raise ValueError(
                f"bank_fingerprint {cfg.bank_fingerprint!r} matches {len(wanted)} of the store's banks "
                f"{[fp[:12] for fp in stored]}; give a longer prefix or bank_path"
            )
        if len(wanted) > 1:
            raise ValueError(
                f"the store {cfg.store} holds {len(wanted)} banks {[fp[:12] for fp in wanted]}; "
                "choose one with bank_fingerprint=..."
            )
        if not wanted:
            log.warning(
                "the store %s holds no bank: only head_only and single_adapter profiles can be served", cfg.store
            )
            return None
        return self.store.load_bank(wanted[0])

    # --- profiles ---

    def problem(self, p: Profile) -> str | None:
        """Why this server cannot serve `p` (None: it can)."""
        return compatibility(p, self.bank, self.dims)

    def _shared_head(self, head_id: str) -> dict[str, torch.Tensor]:
        if head_id not in self._heads:
            self._heads[head_id] = self.store.load_head(head_id)
        return self._heads[head_id]

    def _on_device(self, c: CombinedProfile) -> CombinedProfile:
        if self.device.type == "cpu":
            return c
        names = ("A_hat", "B_hat", "ln_weight", "ln_bias")
        moved = {n: getattr(c, n).to(self.device) for n in names if getattr(c, n) is not None}
        return dataclasses.replace(c, head=c.head.to(self.device), **moved)

    def load_profiles(self, profile_ids: list[str]) -> list[CombinedProfile | ServeError]:
        """Read, check and combine profiles that are not cached; cache and return them (or the refusal)."""
        start = time.perf_counter()
        found: dict[str, CombinedProfile | ServeError] = {}
        todo: list[Profile] = []
        heads: dict[str, dict[str, torch.Tensor]] = {}
        with self._store_lock:
            for pid in dict.fromkeys(profile_ids):
                cached = self.cache.get(pid)
                if cached is not None:
                    found[pid] = cached
                    continue
                try:
                    p = self._record(pid)
                except KeyError:
                    found[pid] = ServeError(404, not_found(pid))
                    continue
                problem = self.problem(p)
                if problem is None and p.head_id is not None:
                    try:
                        heads[p.head_id] = self._shared_head(p.head_id)
                    except KeyError as e:
                        problem = f"profile {pid} uses a shared head the store lacks: {e.args[0]}"
                if problem is not None:
                    found[pid] = ServeError(409, problem)
                    continue
                todo.append(p)
        combined = combine_profiles(todo, self.bank, self.d, heads)
        for p, c in zip(todo, combined, strict=True):
            if isinstance(c, Exception):
                found[p.profile_id] = ServeError(409, str(c))
            else:
                c = self._on_device(c)
                self.cache.put(c)
                found[p.profile_id] = c
        self.stats["profiles_loaded"] += len(todo)
        self.stats["load_seconds"] += time.perf_counter() - start
        return [found[pid] for pid in profile_ids]

    def _record(self, profile_id: str) -> Profile:
        """The stored profile, from memory when its newest version is there (call under _store_lock)."""
        loc = self.store.locate(profile_id)  # re-lists the store when the id is unknown: new profiles appear
        p = self.records.get(loc, profile_id)
        if p is None:
            p = self.store.read(loc)
            self.records.put(loc, p)
            self.stats["store_reads"] += 1
        return p

    def start_preload(self) -> None:
        """Fill the record cache in a background thread (`preloading` is true until it is done); requests are
        served meanwhile. A store that cannot be bulk-read still serves, one read per miss."""
        self.preloading = True

        def run() -> None:
            start = time.perf_counter()
            try:
                n = self.preload_records()
            except Exception:
                log.exception("preloading profile records failed; the store is read on each miss instead")
                return
            log.info("%d profile records preloaded in %.1f s", n, time.perf_counter() - start)

        threading.Thread(target=run, name="xpeft-preload", daemon=True).start()

    def preload_records(self) -> int:
        """Fill the record cache from the store, newest files first, until it is full; returns how many
        records it added. Reads whole files without holding the store lock (stored files never change),
        so requests are served meanwhile."""
        self.preloading = True
        try:
            return self._preload_records()
        finally:
            self.preloading = False

    def _preload_records(self) -> int:
        with self._store_lock:
            newest = self.store.locations()
        by_file: dict[str, list[Location]] = {}
        for loc in newest.values():
            by_file.setdefault(loc.file, []).append(loc)
        added = 0
        for path in sorted(by_file, reverse=True):  # part-<time_ns>-…: newest first
            wanted = {loc.row: loc for loc in by_file[path]}
            for row, p in enumerate(self.store.read_file(path)):
                if row in wanted and not self.records.put(wanted[row], p, evict=False):
                    return added
                added += row in wanted
        return added

    def profile_info(self, profile_id: str) -> dict[str, Any]:
        with self._store_lock:
            try:
                p = self._record(profile_id)
            except KeyError:
                raise ServeError(404, not_found(profile_id)) from None
        problem = self.problem(p)
        return {**summary(p), "servable": problem is None, "problem": problem}

    def profile_page(self, offset: int, limit: int) -> dict[str, Any]:
        with self._store_lock:
            ids = self.store.ids()
        page = ids[offset : offset + limit]
        return {"total": len(ids), "offset": offset, "limit": limit, "profiles": [self.profile_info(i) for i in page]}

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
            by_b.setdefault(c.A_hat.shape[1] if c.A_hat is not None else -1, []).append(i)
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


def not_found(profile_id: str) -> str:
    return f"profile {profile_id!r} is not in the store; GET /v1/profiles lists the stored ones"


def predictions(c: CombinedProfile, logits: list[torch.Tensor]) -> list[dict[str, Any]]:
    if c.problem_type == "regression":
        return [{"score": float(z[0])} for z in logits]
    out = []
    for z in logits:
        probs = torch.softmax(z, dim=-1)
        label = int(probs.argmax())
        name = c.label_names[label] if c.label_names and label < len(c.label_names) else None
        out.append({"label": label, "label_name": name, "probabilities": probs.tolist()})
    return out
