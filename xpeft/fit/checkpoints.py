"""Checkpoints of a fit: the trainable tensors, the optimizer and scheduler state and the FitState, as
torch state dicts and JSON only (read back with weights_only=True: nothing is unpickled)."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from xpeft.fit.loop import FitState

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(
            f"checkpoint holds {sorted(state)} but the model trains {sorted(params)}; it was written by a "
            "run with another mode, mask layout or head: use a new run name or the original config"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ValueError(
                    f"checkpoint {name} is {tuple(state[name].shape)} but the model's is "
                    f"{tuple(p.shape)}; the run was made with another N, b or encoder"
                )
            p.copy_(state[name])


def save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, state: FitState) -> None:
    tensors = {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    torch.save(tensors, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
        json.dump(dataclasses.asdict(state), f)


def read_checkpoint(directory: str) -> tuple[dict, FitState]:
    """(state dicts, FitState) of a checkpoint written by `save_checkpoint`; never unpickles objects."""
    tensors = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    with open(os.path.join(directory, PROGRESS_FILE)) as f:
        return tensors, FitState(**json.load(f))


def resume_from(directory: str, model: nn.Module) -> tuple[FitState, dict, dict]:
    """Load a checkpoint's tensors into `model`; returns what `fit(resume=...)` continues from."""
    tensors, state = read_checkpoint(directory)
    load_trainable_state(model, tensors["model"])
    return state, tensors["optimizer"], tensors["scheduler"]
