"""Ray Serve: every stored profile behind one HTTP endpoint, over one shared backbone and bank.

    serve run xpeft.serving:app_builder store=runs/news backbone=minilm
    XPEFT_STORE=runs/news serve run xpeft.serving:app
    python ray_jobs/serve.py --store runs/news --port 8000

Each replica loads the backbone, the tokenizer and the bank once. A profile is not a Serve model (that would
split batches per profile): the profile id travels in the request, the profile is read from the store
(`ProfileStore`, safetensors/Parquet, no pickle) and combined with the bank once (Â, B̂ per block) into an
LRU cache of `CombinedProfile`s. Stored records are small (mask bits, LN, head), so a second, byte-bounded
cache (`RecordCache`) holds as many as `record_cache_mb` allows, filled in the background at start: a
request to any of them skips the store and pays only for the contraction. Two `@serve.batch` queues
gather concurrent requests of any profiles: one combines the profiles missing from the cache in one
contraction over the bank, the other runs each text of each request as a row of one
`MultiProfileModel.forward_mixed` call (per-row adapters, one encoder pass). A profile fitted after the
server started is found on its first request (the store re-lists its files when an id is unknown); a
profile rewritten in the store is served in its new version once it leaves the combined cache.

HTTP API (OpenAPI schema at /openapi.json, docs at /docs):
    POST /v1/classify           {"profile_id", "texts", optional "text_pairs"} → one prediction per text
    GET  /v1/profiles/{id}      config, metrics, size in bytes, whether this server can serve it
    GET  /v1/profiles?offset&limit
    GET  /healthz               (no auth)
Errors are JSON {"detail": ...}: 400 invalid profile id, 401 missing/wrong token, 404 unknown profile,
409 profile made for another bank or encoder (both fingerprints in the message), 413 body or text limits,
422 malformed JSON, missing or wrong-typed fields, empty text list.

Scale and limits are the fields of `ServeConfig` (documented there). On a 2-core machine keep
`num_cpus` at 1 (the default): each replica reserves its CPUs, and one that cannot be placed never starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from xpeft import __version__
from xpeft.bank import AdapterBank, load_bank
from xpeft.config import DEFAULT_TARGET
from xpeft.model import encoder_blocks, load_encoder, load_tokenizer
from xpeft.multiprofile import CombinedProfile, MultiProfileModel, combine_profile
from xpeft.profiles import MAX_PROFILE_ID, Profile, check_profile_bank, validate_profile_id
from xpeft.profiles import mask_weights as profile_mask_weights
from xpeft.store import Location, ProfileStore
from xpeft.train import Collator, tokenize

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """How the profile server is deployed. Every field can be set from `serve run ... key=value` or an env
    var XPEFT_<KEY> (see `app_builder`)."""

    store: str = field(metadata={"help": "the profile store: a directory or a pyarrow.fs URI (s3://…, gs://…)"})
    backbone: str = field(default="minilm", metadata={"help": "'minilm' (bundled all-MiniLM-L6-v2) or a model dir"})
    bank_path: str | None = field(default=None, metadata={"help": "a bank file (safetensors) instead of the store's"})
    bank_fingerprint: str | None = field(
        default=None, metadata={"help": "which of the store's banks (a prefix will do); default: the only one"}
    )
    # --- scale ---
    num_replicas: int = field(default=1, metadata={"help": "replicas, each with its own backbone, bank and cache"})
    num_cpus: float = field(
        default=1.0,
        metadata={
            "help": "CPUs reserved per replica (Serve's default is 1 too): on 2 cores, 1 leaves one for the proxy; a "
            "replica that cannot be placed never starts"
        },
    )
    num_gpus: float = field(
        default=0.0,
        metadata={"help": "GPUs per replica; > 0 runs the forward on cuda (untested: no GPU on the dev machine)"},
    )
    torch_threads: int | None = field(default=None, metadata={"help": "torch threads per replica (default: num_cpus)"})
    max_ongoing_requests: int = field(
        default=64,
        metadata={"help": "concurrent HTTP requests per replica; Serve's default of 5 would starve batching"},
    )
    max_batch_size: int = field(
        default=32, metadata={"help": "rows (texts) per encoder forward, gathered across requests and profiles"}
    )
    batch_wait_timeout_s: float = field(
        default=0.01, metadata={"help": "how long an idle replica waits for more rows after the first"}
    )
    cache_size: int = field(
        default=256,
        metadata={"help": "combined profiles kept per replica (LRU); ~0.9 MB each for MiniLM at N=100, b=48"},
    )
    record_cache_mb: float = field(
        default=512.0,
        metadata={
            "help": "stored profile records (mask bits, LN, head: ~25 KB each for MiniLM with a 15-class linear "
            "head) kept in memory per replica, newest first, filled from the store in the background when the "
            "replica starts and on every read; a profile among them is combined without touching the store. "
            "0: read the store on every miss of the combined cache"
        },
    )
    # --- limits: each refusal names its limit ---
    max_texts: int = field(default=64, metadata={"help": "texts per request (413 above)"})
    max_text_chars: int = field(default=10_000, metadata={"help": "characters per text or text pair (413 above)"})
    max_body_bytes: int = field(default=2 * 2**20, metadata={"help": "request body bytes (413 above)"})
    max_length: int = field(default=128, metadata={"help": "tokens per text after truncation (the fit loop's)"})
    max_page: int = field(default=500, metadata={"help": "profiles per GET /v1/profiles page (413 above)"})
    api_token: str | None = field(
        default_factory=lambda: os.environ.get("XPEFT_API_TOKEN") or None,
        repr=False,
        metadata={"help": "bearer token for /v1/* (401 without it); default env XPEFT_API_TOKEN; None: no auth"},
    )

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("ServeConfig needs a profile store: pass store=... (or set XPEFT_STORE)")
        positive = (
            "num_replicas",
            "max_ongoing_requests",
            "max_batch_size",
            "cache_size",
            "max_texts",
            "max_text_chars",
            "max_body_bytes",
            "max_length",
            "max_page",
        )
        bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
        if min(self.num_cpus, self.num_gpus, self.batch_wait_timeout_s, self.record_cache_mb) < 0:
            bad.append("num_cpus, num_gpus, batch_wait_timeout_s and record_cache_mb must be >= 0")
        if bad:
            raise ValueError(f"invalid ServeConfig: {', '.join(bad)} (counts and limits must be >= 1)")

    @classmethod
    def from_strings(cls, values: dict[str, str]) -> ServeConfig:
        """A config from string values (`serve run` arguments, env vars), converted by each field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "api_token"}
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"unknown serve settings {sorted(unknown)}; known: {sorted(fields)}")
        kwargs: dict[str, Any] = {}
        for name, raw in values.items():
            default = fields[name].default
            kind = type(default) if default not in (None, dataclasses.MISSING) else str
            if name == "torch_threads":
                kind = int
            try:
                kwargs[name] = kind(raw)
            except ValueError:
                raise ValueError(f"serve setting {name}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**kwargs)


class ServeError(Exception):
    """A refusal with its HTTP status; the message is for the user."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# --- the combined-profile cache and bulk combination --------------------------------------------------------


class ProfileCache:
    """A thread-safe LRU of combined profiles, bounded by count."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, CombinedProfile] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, profile_id: str) -> CombinedProfile | None:
        with self._lock:
            item = self._items.get(profile_id)
            if item is not None:
                self._items.move_to_end(profile_id)
            return item

    def put(self, item: CombinedProfile) -> None:
        with self._lock:
            self._items[item.profile_id] = item
            self._items.move_to_end(item.profile_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class RecordCache:
    """A thread-safe LRU of stored profile records (what `ProfileStore.read` returns), bounded by their
    `record_bytes`, each kept with the location it was read from: a profile rewritten in the store has a new
    location, so its old record is never served for it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, tuple[Location, Profile]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, loc: Location, profile_id: str) -> Profile | None:
        with self._lock:
            item = self._items.get(profile_id)
            if item is None or item[0] != loc:
                return None
            self._items.move_to_end(profile_id)
            return item[1]

    def put(self, loc: Location, profile: Profile, evict: bool = True) -> bool:
        """Keep `profile`, evicting the least recently used records if needed (with evict=False: only if it
        fits as is). Returns whether it was kept."""
        size = profile.record_bytes
        with self._lock:
            old = self._items.get(profile.profile_id)
            freed = old[1].record_bytes if old is not None else 0
            if size > self.max_bytes or (not evict and self.nbytes - freed + size > self.max_bytes):
                return False  # and whatever was kept for this profile stays
            if old is not None:
                del self._items[profile.profile_id]
                self.nbytes -= freed
            while self.nbytes + size > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.nbytes -= dropped.record_bytes
            self._items[profile.profile_id] = (loc, profile)
            self.nbytes += size
            return True

    def __len__(self) -> int:
        return len(self._items)


def mask_weights(profile: Profile, bank: AdapterBank) -> tuple[torch.Tensor, torch.Tensor]:
    """M_A, M_B of a stored x_peft profile as L×N combination weights (what `combine_profile` contracts)."""
    return profile_mask_weights(profile, bank.N, bank.L)


@torch.no_grad()
def combine_profiles(
    profiles: list[Profile], bank: AdapterBank | None, d: int, shared_heads: dict[str, dict[str, torch.Tensor]]
) -> list[CombinedProfile | ValueError]:
    """`combine_profile` for many profiles at once, each result a CombinedProfile or the reason it failed.

    The x_peft ones meet the bank in one contraction (Â = Σ_i M_A[l,i]·A_i for all of them together): a
    single profile's contraction is memory-bound (Â streams all of the bank's A, 44 MB for MiniLM at N=100,
    b=48); on the dev machine Â takes ~2 ms alone and ~0.9 ms a profile in a batch of 16."""
    out: list[CombinedProfile | ValueError | None] = [None] * len(profiles)
    bulk: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, p in enumerate(profiles):
        try:
            if p.config.mode == "x_peft":
                check_profile_bank(p, bank)
                bulk.append((i, *mask_weights(p, bank)))
            else:
                out[i] = combine_profile(p, bank, d, shared_heads.get(p.head_id))
        except (ValueError, KeyError, RuntimeError) as e:
            out[i] = ValueError(f"profile {p.profile_id} cannot be served: {e}")
    if bulk:
        device = bank.A.device
        wA = torch.stack([w for _, w, _ in bulk]).to(device)
        wB = torch.stack([w for _, _, w in bulk]).to(device)
        A_hat = torch.einsum("pln,lnbd->plbd", wA, bank.A)
        B_hat = torch.einsum("pln,lndb->pldb", wB, bank.B)
        for j, (i, _, _) in enumerate(bulk):
            p = profiles[i]
            try:
                # combine_profile's own head and bookkeeping, on a view of the profile without adapters.
                view = dataclasses.replace(p, config=dataclasses.replace(p.config, mode="head_only"), mask_bits=None)
                head_part = combine_profile(view, None, d, shared_heads.get(p.head_id))
                ln = p.config.layer_norm
                out[i] = dataclasses.replace(
                    head_part,
                    A_hat=A_hat[j],
                    B_hat=B_hat[j],
                    ln_weight=p.tensors["ln_weight"] if ln else None,
                    ln_bias=p.tensors["ln_bias"] if ln else None,
                )
            except (ValueError, KeyError, RuntimeError) as e:
                out[i] = ValueError(f"profile {p.profile_id} cannot be served: {e}")
    return out  # type: ignore[return-value]


# --- the engine: everything a replica does, without Ray --------------------------------------------------------


class ProfileEngine:
    """Backbone + tokenizer + bank + store + cache of one replica. Blocking methods; the deployment calls
    them from worker threads so the replica's event loop keeps gathering requests."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        self.device = torch.device("cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.store = ProfileStore(cfg.store)
        self._store_lock = threading.Lock()  # lookups here: the shared-head dict, a record's read-then-keep
        self.bank = self._load_bank()
        encoder = load_encoder(cfg.backbone)
        self.tokenizer = load_tokenizer(cfg.backbone)
        self.collate = Collator(self.tokenizer.pad_token_id or 0)
        self.model = MultiProfileModel(encoder, self.bank.target if self.bank else DEFAULT_TARGET)
        self.L, self.d = len(encoder_blocks(encoder)), encoder.config.hidden_size
        adapted = self.model.adapted[0]
        self.d_in, self.d_out = adapted.in_features, adapted.out_features
        if self.bank is not None and (self.bank.L, self.bank.d_in, self.bank.d_out) != (self.L, self.d_in, self.d_out):
            raise ValueError(
                f"{self.bank.describe()} does not fit backbone {cfg.backbone!r} (L={self.L}, {self.model.target} "
                f"{self.d_in}->{self.d_out}); serve the backbone the bank was made for"
            )
        if self.device.type != "cpu":
            self.model.to(self.device)
            if self.bank is not None:
                self.bank = self.bank.to(self.device)
        self.cache = ProfileCache(cfg.cache_size)
        self.records = RecordCache(int(cfg.record_cache_mb * 2**20))
        self.preloading = False  # True while preload_records fills the record cache
        self._forward_lock = threading.Lock()  # forward_mixed sets adapters on shared modules: one at a time
        self._heads: dict[str, dict[str, torch.Tensor]] = {}  # shared heads (mtl): few, kept for good
        # Since start, for /healthz: forwards, rows, profiles read and combined, and seconds spent on each.
        self.stats = {
            "batches": 0,
            "rows": 0,
            "max_profiles_in_batch": 0,
            "forward_seconds": 0.0,
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
        cfg = p.config
        if cfg.mode == "x_peft":
            if self.bank is None:
                return f"profile {p.profile_id} is an x_peft profile but this server holds no bank"
            if p.bank_fingerprint != self.bank.fingerprint:
                return (
                    f"profile {p.profile_id} was fitted on bank {p.bank_fingerprint} but this server holds bank "
                    f"{self.bank.fingerprint}; serve it from a server with that bank or refit it on this one"
                )
            if (cfg.N, cfg.b) != (self.bank.N, self.bank.b):
                return (
                    f"profile {p.profile_id} has N={cfg.N}, b={cfg.b} but the bank has N={self.bank.N}, b={self.bank.b}"
                )
        if cfg.mode != "head_only" and cfg.target != self.model.target:
            return f"profile {p.profile_id} adapts {cfg.target!r} but this server adapts {self.model.target!r}"
        if cfg.mode == "single_adapter":
            want = {"lora_A": (self.L, cfg.b, self.d_in), "lora_B": (self.L, self.d_out, cfg.b)}
            got = {k: tuple(p.tensors[k].shape) if k in p.tensors else None for k in want}
            if got != want:
                return f"profile {p.profile_id} has adapters {got} but this backbone needs {want}"
        return None

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
        sizes = p.size_report()
        problem = self.problem(p)
        return {
            "profile_id": p.profile_id,
            "mode": p.config.mode,
            "mask_type": p.config.mask_type if p.config.mode == "x_peft" else None,
            "config": p.config.to_dict(),
            "head_id": p.head_id,
            "bank_fingerprint": p.bank_fingerprint,
            "metrics": p.metrics,
            "label_names": p.label_names,
            "size_bytes": sizes["total"],
            "size_report": sizes,
            "created": p.created,
            "servable": problem is None,
            "problem": problem,
        }

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
        """Logits for rows of any profiles: one `forward_mixed` per adapter width b present (in practice one;
        rows of different b cannot share a batched matmul; head_only rows join any)."""
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
                for i, out in zip(idx, self.model.forward_mixed(batch, [items[i][0] for i in idx]), strict=True):
                    logits[i] = out.float().cpu()
            stats = self.stats
            stats["batches"] += 1
            stats["rows"] += len(items)
            stats["max_profiles_in_batch"] = max(stats["max_profiles_in_batch"], len({c.profile_id for c, _ in items}))
            stats["forward_seconds"] += time.perf_counter() - start
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


# --- HTTP schema --------------------------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile_id: str = Field(min_length=1, max_length=MAX_PROFILE_ID, description="a stored profile's id")
    texts: list[str] = Field(min_length=1, description="texts to classify (at most ServeConfig.max_texts)")
    text_pairs: list[str] | None = Field(None, description="second segments for pair tasks, one per text")


class Prediction(BaseModel):
    label: int | None = Field(None, description="the most probable class (classification profiles)")
    label_name: str | None = Field(None, description="its name, when the profile stores label names")
    probabilities: list[float] | None = Field(None, description="softmax over the profile's classes")
    score: float | None = Field(None, description="the predicted value (regression profiles)")


class ClassifyResponse(BaseModel):
    profile_id: str
    predictions: list[Prediction]


class ProfileInfo(BaseModel):
    profile_id: str
    mode: str
    mask_type: str | None
    config: dict[str, Any]
    head_id: str | None
    bank_fingerprint: str | None
    metrics: dict[str, Any]
    label_names: list[str] | None
    size_bytes: int = Field(description="bytes stored for this profile: mask bits + every tensor")
    size_report: dict[str, int]
    created: float
    servable: bool = Field(description="whether this server's backbone and bank can serve it")
    problem: str | None = Field(None, description="why not, when it cannot")


class ProfilePage(BaseModel):
    total: int
    offset: int
    limit: int
    profiles: list[ProfileInfo]


class Health(BaseModel):
    status: str
    backbone: str
    bank_fingerprint: str | None
    cached_profiles: int
    cache_size: int
    batches: int = Field(description="encoder forwards since the replica started")
    rows: int = Field(description="texts classified since the replica started")
    max_profiles_in_batch: int = Field(description="most distinct profiles seen in one forward")
    forward_seconds: float = Field(description="time spent in encoder forwards")
    profiles_loaded: int = Field(description="profiles read from the store and combined (cache misses)")
    load_seconds: float = Field(description="time spent reading and combining them")
    store_reads: int = Field(description="profile records read from the store (misses of the record cache)")
    records_in_memory: int = Field(description="profile records in the record cache")
    preloading: bool = Field(description="whether the record cache is still being filled from the store")
    record_bytes_in_memory: int = Field(description="their record_bytes, bounded by record_cache_mb")


class Detail(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Detail, "description": text}
    for code, text in [
        (400, "invalid profile id"),
        (401, "missing or wrong bearer token"),
        (404, "unknown profile"),
        (409, "profile made for another bank or backbone"),
        (413, "body, text count or text length over the server's limits"),
    ]
}


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, by Content-Length or as they stream."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        detail = f"request body over {self.max_bytes} bytes (ServeConfig.max_body_bytes)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def bearer_auth(token: str | None):
    """A FastAPI dependency refusing requests without `Authorization: Bearer <token>` (None: auth is off)."""
    if not token:
        return None
    expected = token.encode()
    scheme = HTTPBearer(auto_error=False, description="the server's XPEFT_API_TOKEN")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <XPEFT_API_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def make_api(server: ProfileServer) -> FastAPI:
    """The FastAPI app of one replica: routes over `server`, auth, body limit, errors as JSON 4xx."""
    cfg = server.cfg
    api = FastAPI(
        title="xpeft profile server",
        version=__version__,
        description="X-PEFT: every stored profile over one shared backbone and adapter bank.",
    )
    api.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)
    auth = bearer_auth(cfg.api_token)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)] if auth else [], responses=ERRORS)

    @v1.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
    async def classify(request: ClassifyRequest) -> dict[str, Any]:
        return await server.classify(request)

    @v1.get("/profiles/{profile_id}", response_model=ProfileInfo)
    async def profile(profile_id: str) -> dict[str, Any]:
        checked_id(profile_id)
        return await asyncio.to_thread(server.engine.profile_info, profile_id)

    @v1.get("/profiles", response_model=ProfilePage)
    async def profiles(offset: int = Query(0, ge=0), limit: int = Query(50, ge=1)) -> dict[str, Any]:
        if limit > cfg.max_page:
            raise ServeError(413, f"limit={limit} is over {cfg.max_page} profiles a page (ServeConfig.max_page)")
        return await asyncio.to_thread(server.engine.profile_page, offset, limit)

    api.include_router(v1)

    @api.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, Any]:
        bank = server.engine.bank
        return {
            "status": "ok",
            "backbone": cfg.backbone,
            "bank_fingerprint": bank.fingerprint if bank else None,
            "cached_profiles": len(server.engine.cache),
            "cache_size": cfg.cache_size,
            "records_in_memory": len(server.engine.records),
            "preloading": server.engine.preloading,
            "record_bytes_in_memory": server.engine.records.nbytes,
            **server.engine.stats,
        }

    @api.exception_handler(ServeError)
    async def refused(_: Request, e: ServeError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status)

    @api.exception_handler(Exception)
    async def failed(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); see the replica's log"}, status_code=500)

    return api


def checked_id(profile_id: str) -> str:
    try:
        return validate_profile_id(profile_id)
    except ValueError as e:
        raise ServeError(400, str(e)) from None


# --- the Serve deployment -----------------------------------------------------------------------------------

QUEUED_BATCHES = 64  # @serve.batch batches let in at once; the Coalescer below runs them one at a time


class Coalescer:
    """Runs `work(items)` in a worker thread, one call at a time, over everything waiting when the previous
    call ends (at most `max_items`).

    `@serve.batch` closes a batch after `batch_wait_timeout_s` even while the previous one is still running,
    so under load it queues many small batches; merging them here makes the batch as large as the backlog,
    which is what amortises a forward (and a bank contraction) over many rows. Work started for a caller that
    goes away still finishes for the others waiting on it."""

    def __init__(self, work, max_items: int):
        self.work = work
        self.max_items = max_items
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._lock = asyncio.Lock()

    async def __call__(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        mine = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, mine, strict=True))
        async with self._lock:
            while self._pending and not all(f.done() for f in mine):
                take = self._pending[: self.max_items]
                del self._pending[: len(take)]
                await asyncio.shield(asyncio.ensure_future(self._run(take)))
        return list(await asyncio.gather(*mine))

    async def _run(self, take: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await asyncio.to_thread(self.work, [item for item, _ in take])
        except Exception as e:
            for _, f in take:
                if not f.done():
                    f.set_exception(e)
            return
        for (_, f), result in zip(take, results, strict=True):
            if not f.done():
                f.set_result(result)


@serve.deployment
@serve.ingress()
class ProfileServer:
    """One replica: a `ProfileEngine` behind two batch queues and the FastAPI app of `make_api`."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.engine = ProfileEngine(cfg)
        if cfg.record_cache_mb > 0:
            self.engine.preloading = True
            threading.Thread(target=self._preload, name="xpeft-preload", daemon=True).start()
        self._combine_work = Coalescer(self.engine.load_profiles, cfg.max_batch_size)
        self._forward_work = Coalescer(self.engine.forward, cfg.max_batch_size)
        # Serve warns that max_batch_size × QUEUED_BATCHES exceeds max_ongoing_requests; it does not apply
        # here: the queued batches are merged by the Coalescer, never run side by side.
        logging.getLogger("ray.serve").addFilter(lambda record: "max_concurrent_batches" not in record.getMessage())
        self._combine.set_max_batch_size(cfg.max_batch_size)
        self._combine.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._forward.set_max_batch_size(cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _preload(self) -> None:
        start = time.perf_counter()
        try:
            n = self.engine.preload_records()
        except Exception:  # a store that cannot be bulk-read still serves, one read per miss
            log.exception("preloading profile records failed; the store is read on each miss instead")
            return
        log.info("%d profile records preloaded in %.1f s", n, time.perf_counter() - start)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self)

    async def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        cfg = self.cfg
        texts, pairs = request.texts, request.text_pairs
        if len(texts) > cfg.max_texts:
            raise ServeError(
                413,
                f"{len(texts)} texts in one request; the limit is {cfg.max_texts} "
                "(ServeConfig.max_texts): split the request",
            )
        if pairs is not None and len(pairs) != len(texts):
            raise ServeError(422, f"text_pairs has {len(pairs)} entries for {len(texts)} texts; give one per text")
        longest = max(len(t) for t in texts + (pairs or []))
        if longest > cfg.max_text_chars:
            raise ServeError(
                413, f"a text of {longest} characters; the limit is {cfg.max_text_chars} (ServeConfig.max_text_chars)"
            )
        profile_id = checked_id(request.profile_id)
        combined = self.engine.cache.get(profile_id)
        if combined is None:  # read and combine it while the texts are tokenized
            combined, rows = await asyncio.gather(
                self._combine(profile_id), asyncio.to_thread(self.engine.tokenize, texts, pairs)
            )
        else:
            rows = await asyncio.to_thread(self.engine.tokenize, texts, pairs)
        if isinstance(combined, ServeError):
            raise combined
        logits = await asyncio.gather(*(self._forward((combined, row)) for row in rows))
        return {"profile_id": profile_id, "predictions": predictions(combined, logits)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=QUEUED_BATCHES)
    async def _combine(self, profile_ids: list[str]) -> list[CombinedProfile | ServeError]:
        """Profiles missing from the cache, gathered across concurrent requests: one bank contraction."""
        return await self._combine_work(profile_ids)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, max_concurrent_batches=QUEUED_BATCHES)
    async def _forward(self, items: list[tuple[CombinedProfile, dict]]) -> list[torch.Tensor]:
        """Rows of every request of every profile waiting now: one encoder forward."""
        return await self._forward_work(items)


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`: `serve.run(build_app(cfg))`."""
    return ProfileServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg)


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run xpeft.serving:app_builder store=runs/x num_cpus=1 ...`: settings from the arguments, then
    from env vars XPEFT_<SETTING> (XPEFT_STORE, XPEFT_BACKBONE, ...); the token only from XPEFT_API_TOKEN."""
    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "api_token"]
    values = {n: os.environ[f"XPEFT_{n.upper()}"] for n in names if os.environ.get(f"XPEFT_{n.upper()}")}
    values.update(args)
    if "store" not in values:
        raise ValueError("no profile store: pass store=... to `serve run` or set XPEFT_STORE")
    return build_app(ServeConfig.from_strings(values))


# `serve run xpeft.serving:app` (settings from XPEFT_* env vars); a builder, so importing builds nothing.
app = app_builder
