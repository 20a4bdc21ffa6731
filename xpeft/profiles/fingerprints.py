"""Fingerprints of the stored tensors a profile depends on, so a damaged byte is refused, never served.

A bank carries a sha256 of its content in its file (xpeft.core.bank); a shared head and a profile record do
the same here, in the `__metadata__` of their safetensors bytes:
- a shared head, `heads/<head_id>.safetensors`: {"format": "xpeft-head/1", "fingerprint": sha256 of its
  tensors}; a head written before heads were fingerprinted has none and is refused, naming the fix
  (`xpeft profiles verify --fingerprint-heads`): one head serves every mtl profile, so an unverified one could
  turn all their answers wrong at once;
- a profile record, its `tensors` column: {"fingerprint": sha256 of the record's columns and tensors}. Lance
  keeps no checksum of its own (a flipped byte in a data file reads back as other values), so this is what
  tells a damaged record from a good one. A record written before records were fingerprinted has none and is
  read as it is (rewriting every record of a store on upgrade would be a migration); its next write (a refit)
  gives it one, and `xpeft profiles verify` counts those that have none.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

HEAD_FORMAT = "xpeft-head/1"


class FingerprintError(ValueError):
    """Stored bytes that do not match their fingerprint (or cannot be parsed): the file is damaged."""


def tensors_sha256(tensors: dict[str, torch.Tensor], prefix: bytes = b"") -> str:
    """sha256 over `prefix`, then every tensor by name: its name, dtype, shape and bytes."""
    h = hashlib.sha256(prefix)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes ({} when there is none); FingerprintError when unparsable."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        return json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as e:
        raise FingerprintError(f"its safetensors header cannot be read ({type(e).__name__})") from None


def sealed(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def unsealed(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of safetensors bytes; FingerprintError when they cannot be parsed."""
    meta = metadata(blob)
    try:
        return st_load(blob), meta
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for garbled bytes
        raise FingerprintError(f"its tensors cannot be read ({type(e).__name__}: {str(e)[:120]})") from None


# --- shared heads ---------------------------------------------------------------------------------------


def head_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A shared head's file: its tensors with their fingerprint."""
    return sealed(state, {"format": HEAD_FORMAT, "fingerprint": tensors_sha256(state)})


def head_from_bytes(blob: bytes, name: str, fix: str) -> dict[str, torch.Tensor]:
    """A shared head's tensors, verified against its fingerprint. FingerprintError naming the file `name`
    when it is damaged, or has no fingerprint (`fix`: the command that gives it one)."""
    try:
        state, meta = unsealed(blob)
    except FingerprintError as e:
        raise FingerprintError(f"shared head {name} is damaged: {e}; restore the file") from None
    if meta.get("format") != HEAD_FORMAT or not meta.get("fingerprint"):
        raise FingerprintError(
            f"shared head {name} has no fingerprint (it was written before heads were verified), so it cannot be "
            f"told from a damaged one: run `{fix}` once to fingerprint it as it is"
        )
    actual = tensors_sha256(state)
    if actual != meta["fingerprint"]:
        raise FingerprintError(
            f"shared head {name} is damaged: its fingerprint is {meta['fingerprint'][:12]}… but its content hashes "
            f"to {actual[:12]}…; restore the file (or fit the mtl warm start again)"
        )
    return state


# --- profile records ------------------------------------------------------------------------------------

# The columns a record's fingerprint covers besides its tensors (record_bytes is derived from them).
RECORD_COLUMNS = (
    "profile_id", "mode", "mask_type", "config", "head_id", "bank_fingerprint", "metrics", "label_names", "created"
)  # fmt: skip


def record_sha256(row: dict, tensors: dict[str, torch.Tensor]) -> str:
    columns = json.dumps([row.get(c) for c in RECORD_COLUMNS]).encode()
    return tensors_sha256(tensors, columns + b"\0" + (row.get("mask_bits") or b"") + b"\0")


def record_tensors(row: dict) -> dict[str, torch.Tensor]:
    """The tensors of a stored record, verified against its fingerprint when it has one (FingerprintError)."""
    blob = row["tensors"]
    if not blob:
        return {}
    tensors, meta = unsealed(blob)
    expected = meta.get("fingerprint")
    if expected is not None and record_sha256(row, tensors) != expected:
        raise FingerprintError(f"its bytes do not match its fingerprint {expected[:12]}…")
    return tensors
