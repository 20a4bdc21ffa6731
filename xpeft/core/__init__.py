"""The method itself, torch only: the adapter bank, masks, the one combine (mask × bank), the wrapped layer,
the head, the model, the per-row (mixed-profile) forward, and the accounting of Tables 1 and 4."""

from xpeft.core.bank import AdapterBank, load_bank, random_bank, random_bank_for, save_bank
from xpeft.core.combine import combine
from xpeft.core.model import XPeftModel, build_model

__all__ = [
    "AdapterBank",
    "XPeftModel",
    "build_model",
    "combine",
    "load_bank",
    "random_bank",
    "random_bank_for",
    "save_bank",
]
