"""The layers stay layers: the core, the profiles, the data and the fit loop load no Ray and no FastAPI, the
serving engine no Ray and no FastAPI, the HTTP API no Ray; ruff's banned-import rule (TID251, one ruff.toml
per layer) and its complexity limit pass; no module grows past a few hundred lines."""

from __future__ import annotations

import functools
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


# Heavy packages every layer may load where it may load torch: one process imports them once and forks a child per
# module, which imports the module and says which banned packages it loaded (a fresh interpreter each costs seconds).
PRELOAD = ("torch", "transformers", "numpy", "pyarrow", "lance", "safetensors", "starlette")
CHECK = r"""
import json, os, sys
preload, layers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in preload:
    __import__(name)
early = sorted({b for _, banned in layers for b in banned if b in sys.modules})
assert not early, f"the preloaded packages load banned ones: {early}"
found = {}
for module, banned in layers:
    r, w = os.pipe()
    if os.fork() == 0:
        try:
            __import__(module)
            loaded = sorted(b for b in banned if b in sys.modules)
        except BaseException as e:
            loaded = [f"import failed: {e!r}"]
        os.write(w, json.dumps(loaded).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        found[module] = json.loads(f.read())
    os.wait()
print(json.dumps(found))
"""


@functools.cache
def loaded_by_layer() -> dict[str, list[str]]:
    """For each LAYERS module, the banned packages importing it loads: the modules that may load torch in one
    preloaded process, each of the others in a bare one."""
    preloaded = [(m, b) for m, b in LAYERS if not set(b) & {*PRELOAD, "torch"}]
    runs = [(list(PRELOAD), preloaded)] + [([], [layer]) for layer in LAYERS if layer not in preloaded]
    found = {}
    for preload, layers in runs:
        args = [sys.executable, "-c", CHECK, json.dumps(preload), json.dumps(layers)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr
        found |= json.loads(r.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.parametrize("module,banned", LAYERS, ids=[m for m, _ in LAYERS])
def test_a_lower_layer_loads_none_of_the_upper_ones(module, banned):
    assert loaded_by_layer()[module] == [], f"importing {module} loads {loaded_by_layer()[module]}"


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
