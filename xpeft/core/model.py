"""Attach X-PEFT (or a baseline) to a Hugging Face encoder, with its task head (`xpeft.core.head`).

Modes (§3): `x_peft` trains M_A, M_B (L×N logits), the LayerNorm after Â and the head; `single_adapter`
trains one LoRA pair per block and the head; `head_only` trains the head. The encoder and the bank are
frozen in every mode.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from xpeft.config import XPeftConfig, lora_scale
from xpeft.core.bank import AdapterBank
from xpeft.core.combine import combine
from xpeft.core.encoder import adapted_dims, encoder_blocks, load_encoder
from xpeft.core.families import family_name, resolve_target, token_inputs
from xpeft.core.head import Head
from xpeft.core.layer import AdaptedLinear, Adapter, adapters, wrap_linear
from xpeft.core.masks import gumbel_topk, khot, soft_mask
from xpeft.core.packing import Packing, encode_packed

log = logging.getLogger(__name__)


class XPeftModel(nn.Module):
    """An encoder with one adapted linear per block, the profile's trainable tensors and a head.

    `seed` makes the initial trainable tensors (head, LoRA A) depend on it alone, not on the global RNG's
    state (the fit loop then seeds its own noise): the same seed gives the same model wherever it is built."""

    def __init__(self, encoder: nn.Module, cfg: XPeftConfig, bank: AdapterBank | None = None, seed: int | None = None):
        super().__init__()
        # The target as the linear's path in this encoder (a meaning resolved for its family): what a profile
        # taken out of this model records.
        if cfg.mode != "head_only":
            cfg = dataclasses.replace(cfg, target=resolve_target(encoder, cfg.target))
        self.cfg = cfg
        self.tau, self.nu = cfg.tau, cfg.nu  # the Gumbel temperature and noise now (the fit loop may anneal them)
        self.encoder = encoder
        for p in encoder.parameters():
            p.requires_grad_(False)
        d = encoder.config.hidden_size
        self.L = encoder.config.num_hidden_layers
        self.token_inputs = token_inputs(encoder)
        self.adapted: list[AdaptedLinear] = []
        if cfg.mode != "head_only":
            self.adapted = [wrap_linear(block, cfg.target) for block in encoder_blocks(encoder)]
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self._init_trainable(cfg, bank, d)

    def _init_trainable(self, cfg: XPeftConfig, bank: AdapterBank | None, d: int) -> None:
        if cfg.mode == "x_peft":
            if bank is None:
                raise ValueError("x_peft needs an adapter bank; create one with xpeft.core.bank.random_bank_for(...)")
            check_bank(bank, cfg, self.encoder)
            self.bank = bank
            logits = [torch.zeros(self.L, bank.N) for _ in "AB"]
            if cfg.mask_init:
                logits = [t.normal_(0.0, cfg.mask_init) for t in logits]
            self.mask_logits_A, self.mask_logits_B = (nn.Parameter(t) for t in logits)
            if cfg.masks == "B":  # single-mask ablation: Â is the fixed mean of the A_i
                self.mask_logits_A.requires_grad_(False)
            if cfg.layer_norm:
                self.ln_weight = nn.Parameter(torch.ones(self.L, bank.b))
                self.ln_bias = nn.Parameter(torch.zeros(self.L, bank.b))
        elif cfg.mode == "single_adapter":
            _, d_in, d_out = adapted_dims(self.encoder, cfg.target)
            # LoRA init (Hu et al.): A Kaiming-uniform, B zero, so training starts from the frozen model.
            A = torch.empty(self.L, cfg.b, d_in)
            for layer in range(self.L):
                nn.init.kaiming_uniform_(A[layer], a=5**0.5)
            self.lora_A = nn.Parameter(A)
            self.lora_B = nn.Parameter(torch.zeros(self.L, d_out, cfg.b))
        pooler = encoder_pooler(self.encoder, cfg.head)
        self.head = Head(cfg.head, d, cfg.num_labels, cfg.dropout, pooler)

    # --- masks and combined adapters -------------------------------------------------------------------

    def mask_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """M_A and M_B as combination weights (L×N): softmax (soft), Gumbel top-k with straight-through
        gradients in training (hard), deterministic k-hot / k at eval (hard)."""
        cfg = self.cfg
        weights = []
        for name, logits in (("A", self.mask_logits_A), ("B", self.mask_logits_B)):
            # Keyed on the config, not on requires_grad: a model frozen for inference (requires_grad_(False))
            # keeps its k-hot masks. The single-mask ablation's M_A is the softmax of zeros: the mean of the A_i.
            if cfg.mask_type == "soft" or (name == "A" and cfg.masks == "B"):
                w = soft_mask(logits)
            elif self.training:
                w = gumbel_topk(logits, cfg.top_k, tau=self.tau, nu=self.nu)
            else:
                w = khot(logits, cfg.top_k)
            weights.append(w)
        return weights[0], weights[1]

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)`, `.half()`… carry the bank along: it is frozen, so not a parameter or buffer (it
        would be stored with every profile), but it must live where the masks do."""
        super()._apply(fn, recurse)
        if getattr(self, "bank", None) is not None:
            self.bank = self.bank.map(fn)
        return self

    def combined_adapters(self) -> list[Adapter]:
        """One Adapter per block. Weights first: Â = Σ_i M_A[l,i]·A_i is one contraction over the bank."""
        cfg = self.cfg
        if cfg.mode == "single_adapter":
            scale = lora_scale(cfg)
            return [Adapter(self.lora_A[layer], self.lora_B[layer], scale=scale) for layer in range(self.L)]
        A_hat, B_hat = combine(*self.mask_weights(), self.bank)
        ln_w = self.ln_weight if cfg.layer_norm else [None] * self.L
        ln_b = self.ln_bias if cfg.layer_norm else [None] * self.L
        return [Adapter(A_hat[layer], B_hat[layer], ln_w[layer], ln_b[layer]) for layer in range(self.L)]

    # --- forward ---------------------------------------------------------------------------------------

    def encode(self, input_ids, attention_mask, token_type_ids=None, packing: Packing | None = None) -> torch.Tensor:
        """The encoder's last hidden states, R × T × d; a packed batch's (`packing`) unpacked to that layout. Token
        type ids only for an encoder that takes them (`families.token_inputs`)."""
        if "token_type_ids" not in self.token_inputs:
            token_type_ids = None
        if packing is not None:
            return encode_packed(self.encoder, input_ids, token_type_ids, packing)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.encoder(**kwargs).last_hidden_state

    def forward(
        self, input_ids, attention_mask, token_type_ids=None, labels=None, packing: Packing | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits (and the loss, given labels) of a padded batch, or of a packed one (`packing`: input_ids and
        attention_mask are then the packed sequences', and the head reads each row's own tokens)."""
        per_block = self.combined_adapters() if self.adapted else None
        return self.forward_with(per_block, input_ids, attention_mask, token_type_ids, labels, packing)

    def forward_with(
        self,
        per_block: list[Adapter] | None,
        input_ids,
        attention_mask,
        token_type_ids=None,
        labels=None,
        packing: Packing | None = None,
    ) -> dict[str, torch.Tensor]:
        """`forward` with the given adapters in the blocks instead of the masks' combined ones (a warm start's
        per-row adapters: xpeft.fit.warm_start), the model's head and loss."""
        # Training keeps the adapters set after the forward: gradient checkpointing re-runs the blocks in
        # backward() and must find them (see `adapters`); a forward without autograd leaves nothing set.
        with adapters(self.adapted, per_block, keep=self.training and torch.is_grad_enabled()):
            hidden = self.encode(input_ids, attention_mask, token_type_ids, packing)
        logits = self.head(hidden, attention_mask if packing is None else packing.row_mask)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = task_loss(logits, labels, self.cfg.problem_type)
        return out

    # --- what a profile trains -------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: mask, ln, adapter, head (for separate learning rates)."""
        groups: dict[str, list[nn.Parameter]] = {"mask": [], "ln": [], "adapter": [], "head": []}
        for name, p in self.trainable_parameters().items():
            if name.startswith("mask_logits"):
                groups["mask"].append(p)
            elif name.startswith("ln_"):
                groups["ln"].append(p)
            elif name.startswith("lora_"):
                groups["adapter"].append(p)
            else:
                groups["head"].append(p)
        return groups


def encoder_pooler(encoder: nn.Module, head: str) -> nn.Module | None:
    """The encoder's pretrained pooler for a 'pooler' head (None for the other heads); a ValueError naming the
    heads that fit when the encoder has no pooler (ModernBERT, DeBERTa, DistilBERT, ELECTRA)."""
    if head != "pooler":
        return None
    pooler = getattr(encoder, "pooler", None)
    if pooler is None:
        raise ValueError(
            f"the {family_name(encoder) or type(encoder).__name__} encoder has no pooler, so head='pooler' has "
            "nothing pretrained to start from; use head='cls' (its [CLS] state and a classifier, as ModernBERT's "
            "classifier reads it) or head='linear' (the mean of its tokens and a classifier), --head cls / linear"
        )
    return pooler


def task_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


def bank_misfit(bank: AdapterBank, encoder: nn.Module, target: str) -> list[str]:
    """What keeps `bank` off this encoder's `target` linears (nothing: it fits), naming both sides."""
    target = resolve_target(encoder, target)
    L, d_in, d_out = adapted_dims(encoder, target)
    kind = family_name(encoder) or type(encoder).__name__
    problems = []
    if bank.L != L:
        problems.append(f"the {kind} encoder has L={L} blocks but the bank has L={bank.L}")
    if (bank.d_in, bank.d_out) != (d_in, d_out):
        problems.append(f"the {kind} encoder's {target} is {d_in}->{d_out} but the bank is {bank.d_in}->{bank.d_out}")
    try:
        made_for = resolve_target(encoder, bank.target)
    except ValueError:
        made_for = bank.target  # a linear this encoder does not have: another architecture's bank
    if made_for != target:
        problems.append(f"the adapters wrap the {kind} encoder's {target!r} but the bank was made for {bank.target!r}")
    return problems


def check_bank(bank: AdapterBank, cfg: XPeftConfig, encoder: nn.Module) -> None:
    """The bank must fit the encoder and the config; say which side to change when it does not."""
    problems = bank_misfit(bank, encoder, cfg.target)
    if bank.N != cfg.N:
        problems.append(f"the config says N={cfg.N} but the bank has N={bank.N}")
    if bank.b != cfg.b:
        problems.append(f"the config says b={cfg.b} but the bank has b={bank.b}")
    if problems:
        raise ValueError(
            f"{bank.describe()} does not fit this model: " + "; ".join(problems) + ". Make a bank for this "
            "encoder (xpeft.core.bank.random_bank_for(encoder, cfg)) or fix the config."
        )


def build_model(
    cfg: XPeftConfig,
    bank: AdapterBank | None = None,
    backbone: str | None = None,
    encoder: nn.Module | None = None,
    seed: int | None = None,
) -> XPeftModel:
    """An XPeftModel on `encoder` (or one loaded from `backbone`)."""
    return XPeftModel(encoder if encoder is not None else load_encoder(backbone), cfg, bank, seed)
