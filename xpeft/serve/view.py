"""A replica's view of the profile store: the store (its id index built at open: no profile is read), the
byte-bounded record cache, a refresher that keeps the view at most `staleness_s` behind the store's latest
version, the optional background preload, shared heads, and the store's part of the replica's health. Torch
only, like the engine it serves.

Every lookup goes through the index of the version the view holds: an unknown id is a 404 without any I/O, a
refit profile has a new location (so no cache serves its old version), a deleted one is gone. A profile in a
damaged part, or whose record or shared head does not match its fingerprint, is a 503 naming the part or the
file; every other profile is served. Damage found while the replica runs makes it "degraded" at once, and the
refresher reads what is damaged again each time: a restored file is served again and the replica is "ok".
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from xpeft.profiles.fingerprints import FingerprintError
from xpeft.profiles.record import Profile
from xpeft.profiles.store import DamagedPartError, Location, ProfileStore
from xpeft.serve.cache import RecordCache
from xpeft.serve.config import ServeConfig

log = logging.getLogger(__name__)


class ServeError(Exception):
    """A refusal with its HTTP status; the message is for the user."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers  # e.g. Retry-After


def not_found(profile_id: str) -> str:
    return f"profile {profile_id!r} is not in the store; GET /v1/profiles lists the stored ones"


def damaged(e: DamagedPartError) -> ServeError:
    """A profile whose stored part cannot be read: the server's problem, not the request's."""
    return ServeError(503, str(e))


def rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


class StoreView:
    """The store as one replica sees it (see the module's docstring)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.store = ProfileStore(cfg.store)
        self.profiles_at_start = len(self.store)  # builds the id index: the replica is ready after this
        self.records = RecordCache(int(cfg.record_cache_mb * 2**20))
        self.preloading = False
        self.store_reads = 0
        self.refreshed = time.monotonic()
        self.refresh_error: str | None = None
        self._heads: dict[str, dict[str, torch.Tensor]] = {}  # shared heads (mtl): few, kept for good
        self.damaged_heads: dict[str, str] = {}  # head_id -> why it was refused (read again on every refresh)
        self.on_refresh: list = []  # callables run after each refresh (the replica's banks list the store's again)
        self._heads_lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False  # start() runs its threads once per view

    # --- lookups ---

    def locate(self, profile_id: str) -> Location:
        """The location of the served version; ServeError 404 (not stored) or 503 (in a damaged part)."""
        try:
            return self.store.locate(profile_id)
        except KeyError:
            raise ServeError(404, not_found(profile_id)) from None
        except DamagedPartError as e:
            raise damaged(e) from None

    def record(self, profile_id: str) -> tuple[Location, Profile]:
        """The served version of a profile and where it is stored, from memory when it is there."""
        for _ in range(3):  # the version can move between locate and read (a refresh): locate it again
            loc = self.locate(profile_id)
            p = self.records.get(loc, profile_id)
            if p is not None:
                return loc, p
            try:
                p = self.store.read(profile_id, loc)
            except KeyError:
                continue
            except DamagedPartError as e:
                raise damaged(e) from None
            self.store_reads += 1
            self.records.put(loc, p)
            return loc, p
        raise ServeError(404, not_found(profile_id))

    def shared_head(self, head_id: str, profile_id: str) -> dict[str, torch.Tensor]:
        """A shared head, verified when it is read: ServeError 503 naming the file when it is damaged (the
        profiles using it are refused, every other one is served), 409 when the store lacks it."""
        with self._heads_lock:
            if head_id not in self._heads:
                try:
                    self._heads[head_id] = self.store.load_head(head_id)
                except KeyError as e:
                    raise ServeError(
                        409, f"profile {profile_id} uses a shared head the store lacks: {e.args[0]}"
                    ) from None
                except FingerprintError as e:
                    self.damaged_heads[head_id] = str(e)
                    raise ServeError(503, f"profile {profile_id!r} cannot be served: {e}") from None
                self.damaged_heads.pop(head_id, None)
            return self._heads[head_id]

    def page(self, offset: int, limit: int) -> tuple[int, list[str]]:
        """(how many ids the listing pages through, a page of them); damaged parts' ids are not among them."""
        return self.store.count_listed(), self.store.ids(offset, limit)

    # --- keeping up with the store ---

    def refresh(self) -> bool:
        """Move to the store's latest version now; True when it moved."""
        try:
            moved = self.store.refresh()
        except Exception as e:  # a store that cannot be reached is reported by health(), not raised per request
            self.refresh_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else repr(e)
            log.warning("refreshing the store %s failed: %s", self.cfg.store, self.refresh_error)
            return False
        self.refreshed, self.refresh_error = time.monotonic(), None
        return moved

    def start(self) -> None:
        """The refresher thread, and the preload thread when `cfg.preload` (and there is a record cache); once
        per view, however often it is called."""
        if self._started:
            return
        self._started = True
        self.refresh()  # the view may be older than the engine's start-up (the backbone, the bank): catch up
        threading.Thread(target=self._refresh_loop, name="xpeft-store-refresh", daemon=True).start()
        if self.cfg.preload and self.cfg.record_cache_mb > 0:
            self.preloading = True
            threading.Thread(target=self._preload_in_background, name="xpeft-preload", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.cfg.staleness_s):
            self.refresh()
            self.recheck()
            for then in self.on_refresh:
                then()

    def recheck(self) -> bool:
        """Read what is damaged again (parts of the store, shared heads); True when something was repaired."""
        try:
            repaired = self.store.recheck()
        except Exception:  # noqa: BLE001 - a store that cannot be reached is reported by refresh()
            log.debug("rechecking the store's damage failed", exc_info=True)
            repaired = False
        for head_id in list(self.damaged_heads):
            try:
                self.store.load_head(head_id)
            except (KeyError, FingerprintError):
                continue
            self.damaged_heads.pop(head_id, None)
            repaired = True
        return repaired

    def _preload_in_background(self) -> None:
        start = time.perf_counter()
        try:
            n = self.preload_records()
        except Exception:
            log.exception("preloading profile records failed; the store is read on each miss instead")
            return
        log.info("%d profile records preloaded in %.1f s", n, time.perf_counter() - start)

    def preload_records(self) -> int:
        """Fill the record cache from the store, newest parts first, until it is full; returns how many records
        it added. Damaged parts are skipped (health() reports them)."""
        self.preloading = True
        added = 0
        try:
            for loc, p in self.store.profiles(newest_first=True, errors=[]):
                if self._stop.is_set() or not self.records.put(loc, p, evict=False):
                    break
                added += 1
        finally:
            self.preloading = False
        return added

    # --- health ---

    def problems(self) -> list[str]:
        """Why the replica is degraded (empty: it is not)."""
        out = [
            f"part {part} of the profile table ({', '.join(d['files'])}) cannot be read: {d['error']}; "
            f"{d['profiles']} profile(s) in it are refused (503)"
            + ("" if d["ids_known"] else ", and so is any id the readable parts lack (its ids are not indexed)")
            for part, d in sorted(self.store.damaged().items())
        ]
        out += [f"{why}; the profiles using it are refused (503)" for why in self.damaged_heads.values()]
        age = time.monotonic() - self.refreshed
        if self.refresh_error is not None or age > 3 * self.cfg.staleness_s + 5:
            out.append(f"the store was last refreshed {age:.0f} s ago: {self.refresh_error or 'the refresher stalled'}")
        return out

    def health(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "store_profiles": stats["profiles"],
            "store_version": stats["version"],
            "store_parts": stats["parts"],
            "store_age_s": round(time.monotonic() - self.refreshed, 3),
            "index_bytes": stats["index_bytes"],
            "store_reads": self.store_reads,
            "records_in_memory": len(self.records),
            "record_bytes_in_memory": self.records.nbytes,
            "preloading": self.preloading,
        }
