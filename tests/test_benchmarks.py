"""Every benchmark still runs: each script in benchmarks/ is found by glob and run with `--smoke` (a tiny random
backbone, a few rows, seconds), so a renamed method, config field or flag breaks a test, not a user, and a new
script without a smoke setting fails here. (`benchmarks/harness/` holds the parts the scripts share.)

`run_smoke` is also how tests/test_docs.py runs the benchmark commands BENCHMARKS.md and docs/ show. Two commands
whose smoke runs are the same run are run once: a script's `SMOKE` (and `SMOKE_ALSO`) name the settings its
smoke setting replaces, so `store_scale.py --profiles 1000000 --smoke` is, as the script's own parser reads it,
the very run `store_scale.py --smoke` makes. A script with stages is run here with all of them (`every_stage`),
and a command that runs some of them, the same run otherwise, is checked in that run: its stages' output."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py"))
# Scripts being rewritten on other branches, with no smoke setting here yet: strict, so the merge that brings
# one flips its test to a failure until its line goes.
PENDING: dict[str, str] = {}
# Scripts whose smoke runs' files a test reads (tests/test_fidelity.py): each such run writes into a folder of its
# own (--out, which their smoke setting replaces anyway), so the suite runs the script once, not once here and
# again in process there.
WRITES_OUT = ("fidelity.py",)
TIMEOUT_S = 600  # a smoke run takes seconds on an idle machine; this only stops a hang


def runs_dir() -> Path:
    """Where this test run keeps its smoke runs (their output and folders), shared by the run's pytest-xdist
    workers so each distinct run happens once in the whole suite; conftest.py removes it when the run ends."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"  # set by conftest.py
    path = Path(tempfile.gettempdir()) / f"xpeft-smoke-runs-{run}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def smoke_env() -> dict[str, str]:
    """The suite's environment for a script: offline, Ray's token auth off, never a cluster it was not given."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return env


def script_module(script: str):
    """benchmarks/<script> imported (its `main` not run), for its parser and its smoke setting."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(script).stem}", REPO / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def every_stage(script: str) -> list[str]:
    """The arguments of the script's own smoke run here: `--stages` and every stage its parser offers, for a script
    with stages (serve_load.py's run every stage on one Ray), else none."""
    module = script_module(script) if script not in PENDING else None
    parser = module.arguments() if hasattr(module, "arguments") else None
    stages = [a for a in (parser._actions if parser else []) if a.dest == "stages" and a.choices]
    return ["--stages", *stages[0].choices] if stages else []


def smoke_key(script: str, args: list[str]) -> tuple:
    """What `script args --smoke` runs, as the script's parser reads it, less what its smoke setting replaces
    (a script without `arguments()` and `SMOKE`: the command line itself)."""
    module = script_module(script) if script not in PENDING else None
    if module is None or not hasattr(module, "arguments") or not hasattr(module, "SMOKE"):
        return (script, *args)
    replaced = set(module.SMOKE) | set(getattr(module, "SMOKE_ALSO", ()))

    def settings(argv: list[str]) -> dict:  # a command that no longer parses fails here
        return {k: v for k, v in vars(module.arguments().parse_args([*argv, "--smoke"])).items() if k not in replaced}

    mine = settings(args)
    if every_stage(script):  # some of the stages of the script's own run, and otherwise that run: that run
        own = settings(every_stage(script))
        if set(mine["stages"]) <= set(own["stages"]) and {**mine, "stages": None} == {**own, "stages": None}:
            mine = own
    return (script, repr(sorted(mine.items())))


def stages_missing(script: str, args: list[str], stdout: str) -> list[str]:
    """The stages `script args` runs that its (shared) smoke run's output shows no `# stage NAME` line for."""
    if not every_stage(script):
        return []
    stages = vars(script_module(script).arguments().parse_args([*args, "--smoke"]))["stages"]
    shown = set(stdout.splitlines())
    return [name for name in stages if f"# stage {name}" not in shown]


@functools.cache
def script_help(script: str) -> tuple[int, str]:
    """`python SCRIPT --help` (a path from the repository root): exit status and text. Shared with test_docs. A
    benchmark's is its parser's (`arguments()`, which its main parses with) read in this process: a subprocess
    importing torch costs seconds, and each benchmark's smoke run starts the script itself anyway."""
    path = Path(script)
    if path.parent.name == "benchmarks" and path.name not in PENDING and (REPO / path).exists():
        module = script_module(path.name)
        if hasattr(module, "arguments"):
            return 0, module.arguments().format_help()
    r = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=120
    )
    return r.returncode, r.stdout + r.stderr


def run_smoke(script: str, args: list[str] = ()) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> ARGS --smoke` from the repository root, once per distinct smoke run. A script
    whose --help has no --smoke fails without a run: argparse would refuse the flag anyway."""
    code, text = script_help(f"benchmarks/{script}")
    if code != 0 or "--smoke" not in text:
        command = [sys.executable, f"benchmarks/{script}", *args, "--smoke"]
        return subprocess.CompletedProcess(command, 2, "", f"benchmarks/{script} has no --smoke setting:\n{text}")
    return _shared_run(script, list(args))[0]


def _shared_run(script: str, args: list[str]) -> tuple[subprocess.CompletedProcess, Path | None]:
    """The smoke run of `script ARGS`: made by the first worker that asks (the others wait on its lock), then
    read back from its record; with the folder it wrote into (a WRITES_OUT script's)."""
    key = smoke_key(script, args)
    if every_stage(script) and key == smoke_key(script, every_stage(script)):
        args = every_stage(script)  # the script's own run, of every stage, whichever command asks first
    command = [sys.executable, f"benchmarks/{script}", *args, "--smoke"]
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    record, folder = runs_dir() / f"{name}.json", runs_dir() / f"{name}.out"
    with FileLock(str(runs_dir() / f"{name}.lock")):
        if not record.exists():
            out = None
            if script in WRITES_OUT:
                out = folder
                out.mkdir(exist_ok=True)
                command = [*command, "--out", str(out)]
            r = subprocess.run(command, cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
            fields = {"args": r.args, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
            record.write_text(json.dumps({**fields, "out": str(out) if out else None}))
    saved = json.loads(record.read_text())
    out = saved.pop("out")
    return subprocess.CompletedProcess(**saved), Path(out) if out else None


def smoke_folder(script: str, args: list[str] = ()) -> Path:
    """The folder the smoke run of `script ARGS` wrote into (a WRITES_OUT script's), making the run if need be."""
    assert script in WRITES_OUT, f"{script}'s smoke runs write no folder a test reads (WRITES_OUT)"
    return _shared_run(script, list(args))[1]


def assert_ran(r: subprocess.CompletedProcess) -> None:
    command = " ".join(r.args[1:])
    assert r.returncode == 0, f"{command} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    assert r.stdout.strip(), f"{command} printed nothing"


def uses_ray(script: str) -> bool:
    text = (REPO / "benchmarks" / script).read_text()
    return any(call in text for call in ("import ray", "init_ray", "ray.init"))


def params() -> list:
    out = []
    for name in SCRIPTS:
        marks = [pytest.mark.ray] if uses_ray(name) else []
        if name in PENDING:
            marks.append(pytest.mark.xfail(strict=True, reason=PENDING[name]))
        out.append(pytest.param(name, marks=marks))
    return out


def test_every_pending_script_exists():
    """A PENDING line for a script that has gone (merged away) is stale: drop it."""
    assert set(PENDING) <= set(SCRIPTS), sorted(set(PENDING) - set(SCRIPTS))


def test_two_commands_share_a_smoke_run_only_when_it_is_the_same_run():
    assert smoke_key("store_scale.py", ["--profiles", "1000000"]) == smoke_key("store_scale.py", [])
    assert smoke_key("store_scale.py", ["--s3"]) != smoke_key("store_scale.py", [])
    assert every_stage("serve_load.py") == ["--stages", "load", "kill", "slow", "fits"]
    assert every_stage("step_time.py") == []  # no stages: its smoke run is `step_time.py --smoke`
    every = smoke_key("serve_load.py", every_stage("serve_load.py"))
    assert smoke_key("serve_load.py", ["--requests", "300"]) == every  # the load stage (the default), sized
    assert smoke_key("serve_load.py", ["--stages", "kill", "--num-replicas", "2"]) == every
    assert smoke_key("serve_load.py", ["--forwards", "ort"]) != every
    assert smoke_key("serve_load.py", ["--stages", "kill", "--plain-proxy"]) != every  # not the run of every stage
    assert stages_missing("serve_load.py", ["--stages", "kill", "slow"], "# stage load\n# stage kill\n") == ["slow"]
    with pytest.raises(SystemExit):  # a flag the script no longer has
        smoke_key("serve_load.py", ["--no-such-flag"])


@pytest.mark.slow
@pytest.mark.parametrize("script", params())
def test_every_benchmark_runs_its_smoke_setting(script):
    args = every_stage(script)
    r = run_smoke(script, args)
    assert_ran(r)
    missing = stages_missing(script, args, r.stdout)
    assert not missing, f"{script}: no output of the stages {missing}"
