"""xpeft: X-PEFT profiles over one shared bank of frozen LoRA adapters.

The core (config, bank, masks, layer, model, profiles, train) imports no Ray; the Ray pieces
(farm, distributed, tuning, serving) import the core.
"""

from xpeft.bank import AdapterBank, load_bank, random_bank, save_bank
from xpeft.config import TrainConfig, XPeftConfig

__all__ = ["AdapterBank", "TrainConfig", "XPeftConfig", "load_bank", "random_bank", "save_bank"]
__version__ = "0.1.0"
