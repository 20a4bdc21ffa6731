"""The banks a replica serves from (issue 26): every bank of the store, each loaded when a profile first needs it.

A profile fitted on bank F is combined with the newest whole bank grown from F (`Lineages.candidates`; F itself
when none was), its masks zero-extended: the profiles of one lineage all meet its newest bank, one bank in
memory, and an unrelated bank is loaded the first time one of its profiles is asked for. Loaded banks are kept
in an LRU bounded by bytes (`bank_cache_mb`), beside the combined-profile cache; the bank used last always stays.

A bank whose file is damaged (its content or its lineage does not match its fingerprint, or its header cannot be
read) is refused alone and reported, as damage: the profiles fitted on it are refused with 503 naming the file,
and those fitted on its ancestors are served from the newest whole bank of their lineage (a damaged child leaves
its parent's profiles served from the parent). A profile whose bank is in no file of the store, nor grown into
one, is refused with 409 naming the bank. The listing of the store's banks is read again on every refresh (a bank
grown while the replica runs is found within `staleness_s`), and a damaged bank is read again then too: restored,
it is served. Torch only, like the engine.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from xpeft.core.bank import AdapterBank, load_bank
from xpeft.profiles.lineage import Lineages
from xpeft.profiles.record import Profile
from xpeft.profiles.store import ProfileStore
from xpeft.serve.config import ServeConfig
from xpeft.serve.view import ServeError

log = logging.getLogger(__name__)


class ServedBanks:
    """The store's banks as one replica serves them (see the module's docstring)."""

    def __init__(self, cfg: ServeConfig, store: ProfileStore):
        self.cfg, self.store = cfg, store
        self.device = torch.device("cpu")
        self.max_bytes = int(cfg.bank_cache_mb * 2**20)
        self._loaded: OrderedDict[str, AdapterBank] = OrderedDict()
        self.damaged: dict[str, str] = {}  # fingerprint -> why its file was refused (read again on every refresh)
        self._lock = threading.RLock()
        # A bank file outside the store, named by the operator: refused at start when damaged.
        self.path_bank = load_bank(cfg.bank_path) if cfg.bank_path else None
        self.lineages = self._list()

    def _list(self) -> Lineages:
        return Lineages.of(self.store, also=[self.path_bank] if self.path_bank is not None else [])

    # --- loading ---

    def start(self, device: torch.device) -> AdapterBank | None:
        """Load the bank the replica starts with, on `device`: the one bank_path or bank_fingerprint names (a
        damaged one refuses the start, naming the file), else the newest whole bank of the store (None: the
        store holds no bank)."""
        self.device = device
        if self.path_bank is not None:
            return self._keep(self.path_bank.to(device))
        if self.cfg.bank_fingerprint:
            return self._load(self.lineages.find(self.cfg.bank_fingerprint))
        for leaf in self.lineages.newest():
            for fp in [leaf, *reversed([a for a, _ in self.lineages.banks[leaf].lineage])]:
                bank = self._try(fp)
                if bank is not None:
                    return bank
        damage = [*self.lineages.unreadable.values(), *self.damaged.values()]
        if damage:  # every bank of the store is damaged: refused, as a single damaged bank always was
            raise ValueError(f"no bank of {self.lineages.where} can be served: {'; '.join(damage)}")
        log.warning("the store %s holds no bank: only head_only and single_adapter profiles are served", self.cfg.store)
        return None

    def _load(self, fp: str) -> AdapterBank:
        """Load and verify a bank (its lineage too), keep it: FileNotFoundError / ValueError as load_bank."""
        if self.path_bank is not None and fp == self.path_bank.fingerprint:
            return self._keep(self.path_bank.to(self.device))
        bank = self.store.load_bank(fp).to(self.device)
        self.damaged.pop(fp, None)
        log.info("loaded %s", bank.describe())
        return self._keep(bank)

    def _try(self, fp: str) -> AdapterBank | None:
        """The bank, loaded now if it is not in memory; None (recorded as damaged) when its file is refused."""
        with self._lock:
            if fp in self._loaded:
                self._loaded.move_to_end(fp)
                return self._loaded[fp]
            if fp in self.damaged:
                return None
            try:
                return self._load(fp)
            except FileNotFoundError:  # removed since the listing
                return None
            except ValueError as e:
                self.damaged[fp] = str(e)
                log.warning("bank refused: %s", e)
                return None

    def _keep(self, bank: AdapterBank) -> AdapterBank:
        with self._lock:
            self._loaded[bank.fingerprint] = bank
            self._loaded.move_to_end(bank.fingerprint)
            while len(self._loaded) > 1 and self.nbytes > self.max_bytes:
                self._loaded.popitem(last=False)
        return bank

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in list(self._loaded.values()))

    # --- a profile's bank ---

    def bank_for(self, p: Profile) -> AdapterBank:
        """The bank that combines x_peft profile `p`: ServeError 409 when its bank is not in the store (naming
        it), 503 when every bank that could serve it is damaged (naming the files)."""
        fp = p.bank_fingerprint or ""
        for c in self.lineages.candidates(fp):
            bank = self._try(c)
            if bank is not None:
                return bank
        status, detail = self._refusal(p)
        raise ServeError(status, detail)

    def serves(self, p: Profile) -> tuple[str | None, str | None]:
        """(the fingerprint of the bank that would combine `p`, or None and why not), without loading anything."""
        for c in self.lineages.candidates(p.bank_fingerprint or ""):
            if c not in self.damaged:
                return c, None
        return None, self._refusal(p)[1]

    def _refusal(self, p: Profile) -> tuple[int, str]:
        fp = p.bank_fingerprint or ""
        damaged = [self.damaged.get(c) or self.lineages.unreadable.get(c) for c in [*self.lineages.candidates(fp), fp]]
        damaged = list(dict.fromkeys(d for d in damaged if d))
        if damaged:
            return 503, f"profile {p.profile_id!r} cannot be served: {'; '.join(damaged)}"
        return 409, (
            f"profile {p.profile_id!r} was fitted on bank {fp}, which is not in {self.lineages.where} "
            f"(banks/{fp}.safetensors), nor grown into a bank there; copy that bank into the store, or refit the "
            "profile on a bank of the store (xpeft profiles refit)"
        )

    def last(self) -> AdapterBank | None:
        """The bank used last (None: none is loaded)."""
        with self._lock:
            return next(reversed(self._loaded.values()), None)

    # --- keeping up, health ---

    def refresh(self) -> bool:
        """List the store's banks again (a bank grown since is found) and read the damaged ones again; True when
        one was repaired."""
        try:
            lineages = self._list()
        except Exception:  # noqa: BLE001 - a store that cannot be reached is reported by the view's refresh
            log.debug("listing the store's banks failed", exc_info=True)
            return False
        with self._lock:
            self.lineages = lineages
            repaired = False
            for fp in list(self.damaged):
                self.damaged.pop(fp)
                repaired = self._try(fp) is not None or repaired
            return repaired

    def problems(self) -> list[str]:
        """The damaged banks (their profiles are refused with 503, or served from an older bank)."""
        why = {**self.lineages.unreadable, **self.damaged}
        return [
            f"{w}; the profiles fitted on it are refused (503) unless an older bank serves them" for w in why.values()
        ]

    def health(self) -> list[dict]:
        """Each bank of the store: its fingerprint, N, parent, source, the bank its profiles are served from,
        whether it is in memory, and its problem."""
        out = []
        for fp, b in sorted(self.lineages.banks.items(), key=lambda kv: kv[1].order):
            served = next((c for c in self.lineages.candidates(fp) if c not in self.damaged), None)
            out.append(
                {
                    **b.to_dict(),
                    "served_from_bank": served,
                    "in_memory": fp in self._loaded,
                    "problem": self.damaged.get(fp),
                }
            )
        out += [{"fingerprint": fp, "served_from_bank": None, "in_memory": False, "problem": why}
                for fp, why in self.lineages.unreadable.items()]  # fmt: skip
        return out
