"""The replica's two caches: combined profiles (an LRU by count) and stored records (an LRU by bytes). Both keep
each entry with the location of the stored version it came from, and answer only for that location: a refit
profile has a new location, so its old version is never served from memory once the replica has seen the refit."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from xpeft.core.multiprofile import CombinedProfile
from xpeft.profiles.record import Profile
from xpeft.profiles.store import Location


class _LocatedLRU:
    """A thread-safe LRU by profile id whose entries answer only for the location they were kept with."""

    def __init__(self):
        self._items: OrderedDict[str, tuple[Location, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, loc: Location, profile_id: str):
        """The entry of the version at `loc`; None when not cached or cached for another version."""
        with self._lock:
            item = self._items.get(profile_id)
            if item is None or item[0] != loc:
                return None
            self._items.move_to_end(profile_id)
            return item[1]

    def __len__(self) -> int:
        return len(self._items)


class ProfileCache(_LocatedLRU):
    """Combined profiles, bounded by count, each kept with its stored version's location."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, loc: Location, profile_id: str) -> CombinedProfile | None:
        return super().get(loc, profile_id)

    def put(self, loc: Location, item: CombinedProfile) -> None:
        with self._lock:
            self._items[item.profile_id] = (loc, item)
            self._items.move_to_end(item.profile_id)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class RecordCache(_LocatedLRU):
    """Stored profile records (what `ProfileStore.read` returns), bounded by their
    `record_bytes`, each kept with the location it was read from: a profile rewritten in the store has a new
    location, so its old record is never served for it."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes = max_bytes
        self.nbytes = 0

    def get(self, loc: Location, profile_id: str) -> Profile | None:
        return super().get(loc, profile_id)

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
