"""The layers stay layers: the core, the profiles, the data and the fit loop load no Ray and no FastAPI, the
serving engine no Ray and no FastAPI, the HTTP API no Ray; ruff's banned-import rule (TID251, one ruff.toml
per layer) and its complexity limit pass; no module grows past a few hundred lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    # module, packages it must not load
    ("xpeft.core.model", ("ray", "fastapi")),
    ("xpeft.core.multiprofile", ("ray", "fastapi")),
    ("xpeft.profiles.store", ("ray", "fastapi")),
    ("xpeft.data.dataset", ("ray", "fastapi", "torch")),
    ("xpeft.data.tokens", ("ray", "fastapi")),  # token rows and batches, for the fit and the server
    ("xpeft.fit.batching", ("ray", "fastapi")),
    ("xpeft.fit.warm_start", ("ray", "fastapi")),
    ("xpeft.fit.task", ("ray", "fastapi")),
    ("xpeft.serve.engine", ("ray", "fastapi")),
    ("xpeft.serve.batch", ("ray", "fastapi")),
    ("xpeft.core.peft_bank", ("ray", "fastapi", "peft")),
    ("xpeft.profiles.peft_export", ("ray", "fastapi", "peft")),
    ("xpeft.profiles.jobs", ("ray", "fastapi", "torch")),
    ("xpeft.fit.on_demand", ("ray", "fastapi")),
    ("xpeft.serve.fits", ("ray", "fastapi")),  # fits on demand: the deployment gives it Ray actors
    ("xpeft.serve.api", ("ray",)),
    ("xpeft.serve.local", ("ray",)),
    ("xpeft.serve.proxy", ("ray", "fastapi", "torch")),  # loaded by the Serve proxy: Starlette only
]


@pytest.mark.parametrize("module,banned", LAYERS, ids=[m for m, _ in LAYERS])
def test_a_lower_layer_loads_none_of_the_upper_ones(module, banned):
    code = f"import sys, json, {module}; print(json.dumps(sorted(m for m in {list(banned)!r} if m in sys.modules)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [], f"importing {module} loads {r.stdout}"


def test_ruff_passes_with_the_layer_rules_and_the_complexity_limit():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "xpeft", "ray_jobs", "tests", "benchmarks"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in (REPO / "xpeft").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"split these modules: {long}"
