"""A bank from LoRA adapters saved by Hugging Face PEFT: reuse the adapters a team already has (LoRAHub's premise).

A PEFT LoRA folder is `adapter_config.json` + `adapter_model.safetensors` with, per adapted linear,
`<prefix>.<block>.<path>.lora_A.weight` (r × d_in) and `....lora_B.weight` (d_out × r); the adapter adds
(lora_alpha / r)·B·A·x (lora_alpha / √r with use_rslora). N such folders for one base model become a bank on
one target linear per block: bank member i is adapter i, its scale folded into B_i, so an x_peft profile
whose masks are one-hot at i in every block (k = 1, no LayerNorm: `xpeft.fit.warm_start.bank_member_profile`)
computes what PEFT computes with adapter i. Only the files are read (safetensors and JSON): the `peft`
package is not needed.

What a bank cannot hold is refused by name, never silently bent: DoRA, trained biases, per-module alpha
patterns, mixed ranks, other base models, a block without an adapter on the target. An adapter that also
adapts other linears (say query as well as value) is refused too, as bank member i would not reproduce it;
`drop_other_targets=True` keeps the target's pairs and logs what is dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from xpeft.core.bank import AdapterBank, bank_from_adapters
from xpeft.core.families import MEANINGS, resolve_target, split_target

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the base model's module names

# Config settings whose LoRA a bank member (y = Wx + B·A·x) cannot reproduce, with what they would need.
UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vector rescales W itself",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "lora_bias": "a trained bias on lora_B",
    "alpha_pattern": "a lora_alpha per module",
    "layer_replication": "replicated blocks",
}


@dataclass
class PeftAdapter:
    """One PEFT LoRA folder as read: its config and its pairs by (block, linear's path inside the block)."""

    path: str
    config: dict
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # stored tensors that are no block's LoRA pair

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def targets(self) -> list[str]:
        return sorted({p for _, p in self.pairs})

    def scale(self, r: int) -> float:
        """PEFT's scaling of a pair of rank r: lora_alpha / r, or lora_alpha / √r with use_rslora."""
        alpha = float(self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read a folder written by `PeftModel.save_pretrained` (LoRA, safetensors), refusing what a bank cannot hold."""
    path = Path(path)
    cfg_path, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder: it has no {PEFT_CONFIG}")
    if not weights.exists():
        pickled = " (only adapter_model.bin, a pickle: re-save it with safe_serialization=True)"
        raise FileNotFoundError(
            f"{path} has no {PEFT_WEIGHTS}" + (pickled if (path / "adapter_model.bin").exists() else "")
        )
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path} is a {config.get('peft_type')} adapter; a bank is made of LoRA adapters")
    bad = [f"{k} ({why})" for k, why in UNSUPPORTED.items() if config.get(k)]
    if config.get("bias", "none") != "none":
        bad.append(f"bias={config['bias']!r} (trained biases of the base model)")
    if bad:
        raise ValueError(f"{path} uses {', '.join(bad)}: a bank member is a plain LoRA pair B·A and cannot hold that")
    adapter = PeftAdapter(str(path), config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights)).items():
        where = _pair_key(key)
        if where is None:
            adapter.others.append(key)
        else:
            halves.setdefault(where[:2], {})[where[2]] = tensor
    for where, half in halves.items():
        if set(half) != {"A", "B"}:
            raise ValueError(f"{path}: block {where[0]}'s {where[1]} has lora_{''.join(half)} but not both A and B")
        adapter.pairs[where] = (half["A"].float(), half["B"].float())
    return adapter


def _pair_key(key: str) -> tuple[int, str, str] | None:
    """(block, path inside the block, 'A' or 'B') of a stored LoRA tensor, e.g. `base_model.model.encoder.
    layer.3.attention.self.value.lora_A.weight` → (3, 'attention.self.value', 'A'); None for anything else."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
        return None
    module = parts[:-2]
    block = next((i for i, p in enumerate(module) if p.isdigit()), None)  # the index into the list of blocks
    if block is None or block == len(module) - 1:
        return None
    return int(module[block]), ".".join(module[block + 1 :]), parts[-2][-1]


def bank_from_peft(
    paths: Sequence[str | os.PathLike],
    target: str | None = None,
    encoder=None,
    drop_other_targets: bool = False,
) -> AdapterBank:
    """A bank whose member i is the LoRA adapter saved by PEFT in `paths[i]`, on `target` (the linear inside each
    block, e.g. 'attention.self.value', or with `encoder` a meaning such as 'value'; default: the one linear every
    adapter adapts), with each adapter's lora_alpha / r folded into its B. With `encoder`, the bank is checked
    against it (blocks, dimensions). A target on a part of a fused linear (ModernBERT's 'attn.Wqkv[2/3]') takes
    the part's rows of adapters on the whole linear whose B is zero outside them (as xpeft exports such profiles)."""
    adapters = [read_peft_adapter(p) for p in paths]
    if not adapters:
        raise ValueError("a bank from PEFT adapters needs at least one adapter folder; got none")
    bases = sorted({a.base_model for a in adapters if a.base_model})
    if len(bases) > 1:
        raise ValueError(f"the adapters were saved for different base models {bases}; a bank serves one backbone")
    if target is not None and encoder is not None:
        target = resolve_target(encoder, target)
    elif target in MEANINGS:
        raise ValueError(
            f"target {target!r} is a meaning resolved per encoder family: pass the backbone (--backbone) to resolve "
            f"it, or the linear's path, one of {sorted({t for a in adapters for t in a.targets})}"
        )
    target = target or _common_target(adapters)
    module, part = split_target(target)
    L = encoder.config.num_hidden_layers if encoder is not None else _blocks(adapters, module)
    pairs = [_part(a.path, _member(a, module, L, drop_other_targets), part) for a in adapters]
    ranks = {a.path: pair[0].shape[1] for a, pair in zip(adapters, pairs, strict=True)}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"the adapters have different ranks r {ranks}; a bank's members share one b")
    shapes = {a.path: (tuple(A.shape[2:]), tuple(B.shape[1:2])) for a, (A, B) in zip(adapters, pairs, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the adapters' {target} has different dimensions (d_in, d_out): {shapes}")
    bank = bank_from_adapters(pairs, target=target, source="peft")
    if encoder is not None:
        from xpeft.core.model import bank_misfit

        problems = bank_misfit(bank, encoder, target)
        if problems:
            raise ValueError(f"the PEFT adapters do not fit this backbone: {'; '.join(problems)}")
    return bank


def _part(path: str, pair: tuple[torch.Tensor, torch.Tensor], part: tuple[int, int] | None):
    """The pair on `part` of a fused linear's outputs: B's rows of that part, refused where B adapts other rows."""
    A, B = pair
    if part is None:
        return A, B
    size = B.shape[1] // part[1]
    rows = slice(part[0] * size, (part[0] + 1) * size)
    outside = B.clone()
    outside[:, rows] = 0
    if outside.abs().max() > 0:
        raise ValueError(
            f"{path} adapts all of the fused linear's outputs, not only part {part[0]} of {part[1]}: a bank on that "
            "part would not reproduce it; make the bank on the whole linear (its path without [part/parts])"
        )
    return A, B[:, rows].contiguous()


def _common_target(adapters: list[PeftAdapter]) -> str:
    targets = {a.path: a.targets for a in adapters}
    if any(not t for t in targets.values()):
        raise ValueError(f"no LoRA pairs inside transformer blocks in {[p for p, t in targets.items() if not t]}")
    common = set.intersection(*(set(t) for t in targets.values()))
    if len(common) == 1:  # adapters that adapt more linears besides are refused or trimmed by _member
        return common.pop()
    raise ValueError(
        f"the adapters adapt {targets}; a bank holds one pair per block on one target: choose it with "
        f"target= (--target), one of {sorted(common) or 'none: they share no linear'}, and pass "
        "drop_other_targets=True (--drop-other-targets) to leave out the others"
    )


def _blocks(adapters: list[PeftAdapter], target: str) -> int:
    found = [block for a in adapters for block, p in a.pairs if p == target]
    if not found:
        raise ValueError(f"no adapter adapts {target!r}; they adapt {sorted({t for a in adapters for t in a.targets})}")
    return max(found) + 1


def _member(adapter: PeftAdapter, target: str, L: int, drop_other_targets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: L×r×d_in, B: L×d_out×r, scale folded into B) of one adapter on `target`."""
    missing = [block for block in range(L) if (block, target) not in adapter.pairs]
    if missing:
        raise ValueError(
            f"{adapter.path} has no LoRA pair on {target!r} in blocks {missing} of {L}; a bank member adapts "
            "every block (save the adapter without layers_to_transform)"
        )
    beyond = sorted(block for block, p in adapter.pairs if p == target and block >= L)
    if beyond:
        raise ValueError(f"{adapter.path} adapts blocks {beyond} but the backbone has L={L}: another base model")
    other = sorted({p for _, p in adapter.pairs if p != target})
    if other and not drop_other_targets:
        raise ValueError(
            f"{adapter.path} also adapts {other}; a bank member holds only {target!r}, so it would not reproduce "
            "this adapter. Pass drop_other_targets=True (--drop-other-targets) to keep only that"
        )
    if other:
        log.warning("%s: dropped its LoRA pairs on %s (the bank holds %s only)", adapter.path, other, target)
    if adapter.others:
        log.warning("%s: not part of the bank (no LoRA pair of a block): %s", adapter.path, adapter.others)
    As, Bs = zip(*(adapter.pairs[(block, target)] for block in range(L)), strict=True)
    ranks = {A.shape[0] for A in As}
    if len(ranks) > 1:
        raise ValueError(f"{adapter.path} has ranks {sorted(ranks)} across blocks (rank_pattern); a bank has one b")
    scale = adapter.scale(ranks.pop())
    return torch.stack(As), torch.stack(Bs) * scale
