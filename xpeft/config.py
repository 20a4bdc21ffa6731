"""Typed configuration with the paper's defaults (X-PEFT §2, §3 "Experimental settings", Appendix C).

Every field names the paper's symbol where there is one (N, k, b, tau, nu) so that code, CLI, JSON and
docs use one name for one thing, and carries its help (`field(metadata={"help": ...})`, as PEFT's
`LoraConfig` does): `xpeft.flags` turns any of these dataclasses into command-line flags, so every script
shows the same defaults and the same help.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["x_peft", "single_adapter", "head_only"]
MaskType = Literal["soft", "hard"]
HeadType = Literal["pooler", "linear", "cls"]
ProblemType = Literal["classification", "regression"]
Bf16 = Literal["auto", "on", "off"]

MODES: tuple[str, ...] = ("x_peft", "single_adapter", "head_only")
MASK_TYPES: tuple[str, ...] = ("soft", "hard")

# The linear inside each block that the adapter pair wraps, by meaning (xpeft.core.families resolves it per
# encoder family: BERT's `attention.self.value`, DeBERTa's `attention.self.value_proj`...). The paper puts one
# LoRA pair per block (Appendix F's parameter counts fit exactly one d×d pair per block); which linear is not
# stated. The value projection is LoRA's classic target (Hu et al. 2022 adapt W_q and W_v) and measured best of
# the options in BENCHMARKS.md ("target module" study).
DEFAULT_TARGET = "value"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
    **metadata: Any,
) -> Any:
    """A dataclass field with its help; mutable defaults (lists, dicts) are copied per instance, `factory` makes
    the default when an instance is made (from the environment, say), `secret` keeps the value out of the repr.
    Metadata `no_flag=True` keeps it off the command line, `renamed_from=(...)` names what it was called before
    (see `xpeft.flags`: a script that still uses an old name is told the new one)."""
    meta = {"help": help, **metadata}
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):  # a nested config: a copy per instance
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """Dict round trips shared by the configs: unknown keys are refused, naming the known ones."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


@dataclass(kw_only=True)
class BackboneBankFields:
    """The backbone and the bank file, declared once for every config that loads them (the farm's, a task
    fit's, the server's)."""

    backbone: str = option("minilm", "'minilm' (the bundled all-MiniLM-L6-v2), 'tiny', a local path or a hub name")
    bank_path: str | None = option(
        None,
        "a bank file (safetensors, verified against its fingerprint) instead of a random one (fits) or the "
        "store's (serving)",
        renamed_from=("--bank",),
    )


@dataclass(kw_only=True)
class RandomBankFields(BackboneBankFields):
    """... and the random bank a fit draws when it is given no bank file."""

    bank_seed: int = option(0, "seed of the random bank")
    bank_scale: float = option(1.0, "scale of the random bank's adapters")


@dataclass
class XPeftConfig(Config):
    """What a profile is made of: the mode, the masks and the head.

    Defaults follow the paper: N=100 adapters, k=50 (half the bank), b=48 (LoRA reduction factor 16 on
    bert-base), Gumbel noise nu=1 and temperature tau=1 (Algorithm 1), LayerNorm after Â, two masks.
    """

    mode: Mode = option("x_peft", "x_peft (masks over the bank), or the baselines single_adapter / head_only")
    mask_type: MaskType = option("hard", "hard: k-hot masks, stored as bits (Gumbel top-k); soft: softmax weights")
    N: int = option(100, "N, adapters in the bank (a learned sa / mtl bank has one per warm-start profile)")
    k: int | None = option(None, "k, adapters a hard mask selects per block (k < N); default: half the bank")
    b: int = option(48, "b, the adapters' bottleneck dimension")
    tau: float = option(1.0, "tau, the Gumbel-softmax temperature (Algorithm 1)")
    nu: float = option(1.0, "nu, the Gumbel noise level while training (Algorithm 1); none at eval")
    layer_norm: bool = option(True, "a LayerNorm after Â (footnote 1 of §2)")
    masks: Literal["AB", "B"] = option("AB", "AB: M_A and M_B; B: the single-mask ablation of §3.2 (Â = mean A_i)")
    target: str = option(
        DEFAULT_TARGET,
        "the linear of each block the adapters wrap: value, query, attention_output, ffn_output (resolved per "
        "encoder family), or its dotted path inside a block",
    )
    head: HeadType = option(
        "pooler",
        "pooler: the encoder's pooler + classifier (Table 4; encoders with a pooler); linear: mean-pool + "
        "classifier; cls: the [CLS] state + classifier",
    )
    num_labels: int = option(2, "classes (1 for a regression target)")
    problem_type: ProblemType = option("classification", "classification (cross-entropy) or regression (MSE)")
    lora_alpha: float | None = option(None, "single_adapter's LoRA alpha (scale alpha/b); default alpha = b")
    dropout: float = option(0.1, "dropout before the classifier, as in BertForSequenceClassification")
    text_pair: bool | None = option(
        None,
        "whether the profile was fitted on text pairs (set by the fit from its data, as num_labels is; the "
        "server refuses the other kind of input). None: not recorded (profiles stored before it was): both served",
        no_flag=True,
    )
    mask_init: float = option(0.0, "std of the mask logits' normal init (0: zeros, every adapter tied at the start)")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def top_k(self) -> int:
        """The k a hard mask selects: `k` as given, else the paper's ratio (k = 50 of N = 100), half the bank
        and at least 1, so a bank whose N is fixed later (a learned bank) still gets a proper subset."""
        return self.k if self.k is not None else default_k(self.N)


def lora_scale(cfg: XPeftConfig) -> float:
    """single_adapter's LoRA scale alpha / b (1 when lora_alpha is unset); X-PEFT adapters are unscaled."""
    return (cfg.lora_alpha or cfg.b) / cfg.b if cfg.mode == "single_adapter" else 1.0


def default_k(N: int) -> int:
    """Half the bank, at least 1: the paper's k = 50 of N = 100."""
    return max(1, N // 2)


def check_k(k: int, N: int) -> None:
    """A hard mask selects a proper subset of the bank: 1 <= k < N. With k = N every block selects every
    adapter, so every profile's masks are the same and carry nothing; the error says what to change."""
    if N < 2:
        raise ValueError(
            f"hard masks need a bank of at least 2 adapters to choose from, got N={N}; use soft masks "
            "(--mask-type soft) or a bigger bank (a larger --N, or more --warm-start profiles for sa / mtl)"
        )
    if not 1 <= k < N:
        raise ValueError(
            f"a hard mask selects a proper subset of the bank, so 1 <= k < N; got k={k}, N={N} "
            f"(k >= N would select every adapter: every profile's masks identical). Use --k below {N}, "
            f"or leave k unset for half the bank (k={default_k(N)})"
        )


def validate(cfg: XPeftConfig) -> None:
    """Fail fast, with the fix in the message, on a configuration that cannot be built."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be 'soft' or 'hard', got {cfg.mask_type!r}")
    if cfg.b < 1:
        raise ValueError(f"bottleneck b must be >= 1, got b={cfg.b}")
    if cfg.mode == "x_peft":
        if cfg.N < 1:
            raise ValueError(f"the bank needs at least one adapter, got N={cfg.N}")
        if cfg.mask_type == "hard":
            check_k(cfg.top_k, cfg.N)
        if cfg.tau <= 0:
            raise ValueError(f"temperature tau must be > 0, got {cfg.tau}")
    if cfg.masks not in ("AB", "B"):
        raise ValueError(f"masks must be 'AB' (M_A and M_B) or 'B' (single-mask ablation), got {cfg.masks!r}")
    if cfg.head not in ("pooler", "linear", "cls"):
        raise ValueError(f"head must be 'pooler', 'linear' or 'cls', got {cfg.head!r}")
    if cfg.problem_type == "regression" and cfg.num_labels != 1:
        raise ValueError("a regression head (STS-B) has num_labels=1")
    if cfg.problem_type == "classification" and cfg.num_labels < 2:
        raise ValueError(f"a classifier needs num_labels >= 2, got {cfg.num_labels}")


@dataclass
class TrainConfig(Config):
    """The fit loop's settings. Defaults are the paper's (§3): AdamW, lr 1e-5 with linear decay, 10 epochs,
    batch 64, max length 128, seed 42.

    `mask_lr`, `ln_lr`, `head_lr` and `adapter_lr` override `lr` for one role each: masks are logits behind a
    softmax and move little at 1e-5 (BENCHMARKS.md, quality study; `xpeft.fit.recipes` has measured sets).
    """

    lr: float = option(1e-5, "learning rate (AdamW, linear decay to 0)")
    mask_lr: float | None = option(None, "learning rate of the mask logits (default: lr)")
    ln_lr: float | None = option(None, "learning rate of the LayerNorm after Â (default: lr)")
    head_lr: float | None = option(None, "learning rate of the head (default: lr)")
    adapter_lr: float | None = option(None, "learning rate of single_adapter's A and B (default: lr)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "share of the steps with a linear warm-up")
    epochs: int = option(10, "passes over the training rows")
    batch_size: int = option(64, "rows per optimiser step (the global batch under data parallelism)")
    max_length: int = option(128, "tokens per text after truncation")
    seed: int = option(42, "seed of the initial tensors, the shuffling, dropout and the Gumbel noise")
    gradient_checkpointing: bool = option(False, "recompute the encoder's activations in the backward pass")
    max_steps: int | None = option(None, "stop after this many steps (smoke runs)")
    tau_final: float | None = option(None, "anneal tau linearly to this value over the fit (hard masks)")
    nu_final: float | None = option(None, "anneal the Gumbel noise nu linearly to this value over the fit")
    log_every: int = option(0, "log the running loss every n steps (0: never)")
    packing: bool = option(
        True,
        "pack each batch's rows back to back into a few sequences (attention within a row only, positions from 0 "
        "per row): the padded batch's results without its padding, where the model's packed forward equals its "
        "padded one (checked; else padded, logged); False: pad each batch to its longest row",
    )
    bf16: Bf16 = option(
        "auto",
        "bf16 autocast of the forward, fp32 weights and optimizer: auto = on where the device has native bf16 (a "
        "CPU with AVX512-BF16 or AMX-BF16, a CUDA GPU that supports it), on, or off",
    )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError(
                f"epochs and batch_size must be >= 1 and max_length >= 8; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, max_length={self.max_length}"
            )
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")
