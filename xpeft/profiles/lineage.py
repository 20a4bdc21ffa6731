"""The banks of a store as lineages (issue 26): which bank serves a profile, which is the newest, which are older.

A bank grown from another (`xpeft.core.bank.grow_bank`) names its ancestors in its file (their fingerprints and
N, oldest first); a profile names the bank it was fitted on. A profile fitted on bank F can be combined with F or
with any bank grown from F (its masks zero-extended), its *candidates*, newest first: the bank grown the most times
(then the largest N). A store may hold several lineages (unrelated banks, or branches grown from one bank).

Only the files' headers are read here (no tensor is): a load verifies a bank and its lineage (`load_bank`). A
header that cannot be read is kept apart as unreadable, naming the file, never taken for a bank that is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from xpeft.core.bank import AdapterBank, read_lineage
from xpeft.profiles.fingerprints import FingerprintError
from xpeft.profiles.store import ProfileStore

FLAG = "bank_fingerprint (--bank-fingerprint)"


@dataclass(frozen=True)
class StoredBank:
    """What a bank file's header says: its fingerprint, N, its ancestors (fingerprint, N; oldest first), source."""

    fingerprint: str
    N: int
    lineage: tuple[tuple[str, int], ...] = ()
    source: str = ""

    @property
    def parent(self) -> str | None:
        return self.lineage[-1][0] if self.lineage else None

    def grown_from(self, fingerprint: str) -> bool:
        return fingerprint in dict(self.lineage)

    @property
    def order(self) -> tuple:
        """Newest last: grown more times, then more members (the fingerprint only breaks ties)."""
        return len(self.lineage), self.N, self.fingerprint

    @classmethod
    def of(cls, bank: AdapterBank) -> StoredBank:
        return cls(bank.fingerprint, bank.N, bank.lineage, bank.source)

    def to_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "N": self.N, "parent": self.parent, "source": self.source}


class Lineages:
    """The store's banks by fingerprint, as their headers describe them, and the files that cannot be read."""

    def __init__(self, banks: dict[str, StoredBank], unreadable: dict[str, str], where: str = "the store"):
        self.banks, self.unreadable, self.where = banks, unreadable, where

    @classmethod
    def of(cls, store: ProfileStore, also: Iterable[AdapterBank] = ()) -> Lineages:
        """The banks of `store` (one header read each), and `also` banks held elsewhere (a server's bank_path)."""
        banks, unreadable = {}, {}
        for fp in store.bank_fingerprints():
            name = f"{store.root}/banks/{fp}.safetensors"
            try:
                meta = store.bank_metadata(fp)
                if meta.get("fingerprint") != fp:
                    raise ValueError(f"it says it is bank {meta.get('fingerprint')!r}: renamed, or its header damaged")
                banks[fp] = StoredBank(fp, int(meta["N"]), read_lineage(meta, name), meta.get("source", ""))
            except FileNotFoundError:  # removed since the listing
                continue
            except (FingerprintError, ValueError, KeyError) as e:
                unreadable[fp] = f"bank {name} is unreadable ({e}); restore the file"
        for bank in also:
            banks[bank.fingerprint] = StoredBank.of(bank)
        return cls(banks, unreadable, f"the store {store.uri}")

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint in self.banks or fingerprint in self.unreadable

    def candidates(self, fingerprint: str) -> list[str]:
        """The banks that can combine a profile fitted on `fingerprint`, newest first: those grown from it, then
        itself (when it is here)."""
        grown = sorted((b for b in self.banks.values() if b.grown_from(fingerprint)), key=lambda b: b.order)
        return [b.fingerprint for b in reversed(grown)] + ([fingerprint] if fingerprint in self.banks else [])

    def newest(self) -> list[str]:
        """The newest bank of each lineage (no bank here was grown from it), newest first."""
        ancestors = {fp for b in self.banks.values() for fp, _ in b.lineage}
        leaves = [b for fp, b in self.banks.items() if fp not in ancestors]
        return [b.fingerprint for b in sorted(leaves, key=lambda b: b.order, reverse=True)]

    def the_newest(self) -> str | None:
        """The newest bank, when the banks here form one lineage (None: there is none); a ValueError naming them
        and the flag to choose with when there are several."""
        leaves = self.newest()
        if len(leaves) > 1:
            shown = ", ".join(f"{fp[:12]} (N={self.banks[fp].N})" for fp in leaves)
            raise ValueError(
                f"{self.where} holds {len(leaves)} banks that were not grown from one another ({shown}): choose one "
                f"with {FLAG}"
            )
        return leaves[0] if leaves else None

    def older_than(self, fingerprint: str) -> set[str]:
        """The banks `fingerprint` was grown from (its ancestors): profiles fitted on them are older than it."""
        return {fp for fp, _ in self.banks[fingerprint].lineage} if fingerprint in self.banks else set()

    def find(self, value: str) -> str:
        """The fingerprint of the bank `value` names: a fingerprint here, or a unique prefix of one. A file path is
        refused naming --bank-path (a bank file), anything else naming the banks there are."""
        if os.sep in value or value.endswith(".safetensors") or os.path.exists(value):
            raise ValueError(
                f"{FLAG} {value!r} is a file path: a bank file is given with bank_path (--bank-path); "
                f"{FLAG} names a bank of the store by its fingerprint (or a unique prefix)"
            )
        known = sorted({*self.banks, *self.unreadable})
        matches = [fp for fp in known if fp.startswith(value.lower())] if value else []
        if len(matches) == 1:
            return matches[0]
        shown = ", ".join(f"{fp[:12]}" for fp in known) or "none"
        raise ValueError(
            f"{FLAG} {value!r} matches {len(matches)} of the banks of {self.where} ({shown}); give one of them "
            "(a unique prefix will do)"
        )
