"""Table 1 and Table 4, computed from dimensions alone (no weights downloaded)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xpeft.core.accounting import dims_of, fmt_count, fmt_millions, head_params, profile_bytes, trainable_params

BERT = dims_of("bert-base-uncased")


@pytest.mark.parametrize(
    "N,params,shown,hard_bytes", [(100, 3552, "3.5K", 312), (200, 5952, "5.9K", 600), (400, 10752, "10.7K", 1200)]
)
def test_table_1_x_peft(N, params, shown, hard_bytes):
    p = trainable_params("x_peft", N, 48, BERT)
    assert p == params and fmt_count(p) == shown
    assert profile_bytes("x_peft", "hard", N, 48, BERT)["mask_bits"] == hard_bytes
    soft = profile_bytes("x_peft", "soft", N, 48, BERT)["masks_float"]
    assert soft == 2 * N * 12 * 4 and round(soft, -4) == N * 100  # ≈10K / 20K / 40K


def test_table_1_single_adapter():
    p = trainable_params("single_adapter", 0, 48, BERT)
    assert p == 884_736 and fmt_count(p) == "884.7K"
    assert profile_bytes("single_adapter", "-", 0, 48, BERT, shared_head=True)["total"] == 3_538_944  # 3.5M


@pytest.mark.parametrize(
    "N,excl,incl2,incl3,incl15",
    [
        (100, "0.004M", "0.596M", "0.596M", "0.606M"),
        (150, "0.005M", "0.597M", "0.598M", "0.607M"),
        (200, "0.006M", "0.598M", "0.599M", "0.608M"),
        (400, "0.011M", "0.603M", "0.604M", "0.613M"),
        (800, "0.020M", "0.612M", "0.613M", "0.622M"),
    ],
)
def test_table_4_parameter_counts(N, excl, incl2, incl3, incl15):
    p = trainable_params("x_peft", N, 48, BERT)
    assert fmt_millions(p) == excl
    for c, want in ((2, incl2), (3, incl3), (15, incl15)):
        assert fmt_millions(p + head_params(768, c)) == want


def test_pooler_head_is_590592_parameters_plus_classifier():
    assert head_params(768, 2) - (768 * 2 + 2) == 590_592


def test_full_record_reports_what_else_a_profile_stores():
    parts = profile_bytes("x_peft", "hard", 100, 48, BERT, c=2)
    assert parts["ln"] == 2 * 48 * 12 * 4
    assert parts["head"] == head_params(768, 2) * 4
    assert parts["total"] == 312 + parts["ln"] + parts["head"]
    assert profile_bytes("x_peft", "hard", 100, 48, BERT, shared_head=True)["head"] == 0


def test_params_cli_prints_every_mode():
    out = subprocess.run(
        [sys.executable, "-m", "xpeft.cli", "params", "--backbone", "bert-base-uncased", "--N", "100", "200", "400"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for needle in ("x_peft (hard)", "x_peft (soft)", "single_adapter", "head_only", "3.5K", "884.7K", "312"):
        assert needle in out


def test_unknown_backbone_names_the_fix():
    with pytest.raises(ValueError, match="config.json"):
        dims_of("no-such-model")
