"""Typed configuration with the paper's defaults (X-PEFT §2, §3 "Experimental settings", Appendix C).

Every field names the paper's symbol where there is one (N, k, b, tau, nu) so that code, CLI, JSON and
docs use one name for one thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["x_peft", "single_adapter", "head_only"]
MaskType = Literal["soft", "hard"]
HeadType = Literal["pooler", "linear"]
ProblemType = Literal["classification", "regression"]

MODES: tuple[str, ...] = ("x_peft", "single_adapter", "head_only")
MASK_TYPES: tuple[str, ...] = ("soft", "hard")

# The linear inside each BERT block that the adapter pair wraps. The paper puts one LoRA pair per block
# (Appendix F's parameter counts fit exactly one d×d pair per block); which linear is not stated.
# `attention.self.value` is LoRA's classic target (Hu et al. 2022 adapt W_q and W_v) and measured best
# of the options in BENCHMARKS.md ("target module" study).
DEFAULT_TARGET = "attention.self.value"


@dataclass
class XPeftConfig:
    """What a profile is made of: the mode, the masks and the head.

    Defaults follow the paper: N=100 adapters, k=50, b=48 (LoRA reduction factor 16 on bert-base),
    Gumbel noise nu=1 and temperature tau=1 (Algorithm 1), LayerNorm after Â, two masks (M_A and M_B).
    """

    mode: Mode = "x_peft"
    mask_type: MaskType = "hard"
    N: int = 100  # number of adapters in the bank
    k: int | None = None  # adapters a hard mask selects per block (top-k); None: half the bank (see top_k)
    b: int = 48  # adapter bottleneck dimension
    tau: float = 1.0  # Gumbel-softmax temperature (Algorithm 1)
    nu: float = 1.0  # Gumbel noise level (Algorithm 1); no noise at eval
    layer_norm: bool = True  # LayerNorm after Â (footnote 1 of §2)
    masks: Literal["AB", "B"] = "AB"  # "B": the single-mask ablation of §3.2 (Â = mean of the A_i)
    target: str = DEFAULT_TARGET
    head: HeadType = "pooler"  # "pooler": BERT pooler + classifier as in the paper (Table 4)
    num_labels: int = 2
    problem_type: ProblemType = "classification"
    lora_alpha: float | None = None  # single_adapter scaling alpha/b; None = alpha = b (scale 1)
    dropout: float = 0.1  # dropout before the classifier, as in BertForSequenceClassification

    def __post_init__(self) -> None:
        validate(self)

    @property
    def top_k(self) -> int:
        """The k a hard mask selects: `k` as given, else the paper's ratio (k = 50 of N = 100), half the bank
        and at least 1, so a bank whose N is fixed later (a learned bank) still gets a proper subset."""
        return self.k if self.k is not None else default_k(self.N)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> XPeftConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown X-PEFT config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


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
    if cfg.head not in ("pooler", "linear"):
        raise ValueError(f"head must be 'pooler' or 'linear', got {cfg.head!r}")
    if cfg.problem_type == "regression" and cfg.num_labels != 1:
        raise ValueError("a regression head (STS-B) has num_labels=1")
    if cfg.problem_type == "classification" and cfg.num_labels < 2:
        raise ValueError(f"a classifier needs num_labels >= 2, got {cfg.num_labels}")


@dataclass
class TrainConfig:
    """The fit loop's settings. Defaults are the paper's (§3): AdamW, lr 1e-5 with linear decay, 10 epochs,
    batch 64, max length 128, seed 42.

    `mask_lr`, `ln_lr` and `head_lr` override `lr` for the mask logits, the LayerNorm after Â and the
    task head; masks are logits behind a softmax and move little at 1e-5 (see BENCHMARKS.md).
    """

    lr: float = 1e-5
    mask_lr: float | None = None
    ln_lr: float | None = None
    head_lr: float | None = None
    adapter_lr: float | None = None  # single_adapter's A and B
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    max_length: int = 128
    seed: int = 42
    gradient_checkpointing: bool = False
    max_steps: int | None = None  # stop early (tests, smoke runs)
    tau_final: float | None = None  # anneal tau linearly to this value over training (hard masks)
    log_every: int = 0  # log the running loss every n steps (0: never)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError(
                f"epochs and batch_size must be >= 1 and max_length >= 8; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, max_length={self.max_length}"
            )
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**d)


@dataclass
class BankConfig:
    """How a random bank is drawn (the paper's random adapters, §2 "Connection to the Lottery Ticket
    Hypothesis"): A_i and B_i ~ N(0, 1/fan_in) * scale, from a seed."""

    N: int = 100
    b: int = 48
    seed: int = 0
    scale: float = 1.0
    target: str = DEFAULT_TARGET
    extra: dict[str, Any] = field(default_factory=dict)
