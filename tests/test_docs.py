"""Every command the docs show still works: no documented command can rot.

The convention (README.md, docs/*.md and BENCHMARKS.md): each fenced ```bash block is preceded, on the line
before its fence (blank lines between are allowed), by one marker:

    <!-- test: run -->                    run the block here: it must exit 0
    <!-- test: run timeout=300 append="--max-profiles 4 --epochs 1" -->
                                          the same, with a time limit in seconds (default 120) and flags
                                          appended to every `xpeft ...` / `python ray_jobs/...` /
                                          `python benchmarks/...` command in the block, to run it at a
                                          small size (BENCHMARKS.md's: append="--smoke")
    <!-- test: run needs=shared-data -->  run where ../shared/data (or XPEFT_DATA_DIR) is, skipped with the
                                          reason elsewhere
    <!-- test: skip (needs an AWS account) -->
                                          not run (a cluster, a long run, a server); the reason is required

A ```bash (or ```sh / ```shell) block without a marker fails the test, so a new block cannot slip by
untested, and so does a command (an `xpeft`, ray_jobs or benchmarks call) in any other fenced block: output
belongs in ```text blocks, without the command. Run blocks run in document order (README.md, docs/*.md, then
BENCHMARKS.md), each as one bash script (`set -euo pipefail`), in one scratch copy of the repository (so
`runs/...` outputs never land in the checkout; a block sees what earlier blocks wrote), with the virtualenv
first on PATH, Hugging Face offline and Ray's token auth off. `append` flags go at the end of each command,
before any pipe, redirection or comment. A block running a benchmark that has no smoke setting yet
(tests/test_benchmarks.py's PENDING) is a strict expected failure.

Skipped blocks are still checked: every `xpeft SUBCOMMAND ...`, `python ray_jobs/SCRIPT.py ...` and `python
benchmarks/SCRIPT.py ...` in any block (also after `ray job submit ... --`) must name an existing command and
use only flags its `--help` lists, and every `make TARGET` must be a Makefile target. A benchmark script that
has left the tree may be named only beside the commit that still has it, and every dotted `xpeft.` name in
the docs must resolve. Besides the docs, `xpeft --help`, the `--help` of every xpeft subcommand and of every
ray_jobs script must exit 0.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import shared_data_dir
from test_benchmarks import PENDING, assert_ran, run_smoke, script_help, stages_missing

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "BENCHMARKS.md"]
MARKER = re.compile(r"<!--\s*test:\s*(?P<kind>run|skip)\b(?P<rest>.*?)-->")
SEPARATORS = {"&&", "||", "|", ";", "&"}
SCRIPTS = sorted(p.name for p in (REPO / "ray_jobs").glob("*.py") if not p.name.startswith("_"))
SCRIPT_DIRS = ("ray_jobs/", "benchmarks/")  # `python DIR/NAME.py ...`: documented scripts
NEEDS = {"shared-data"}


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    code: str
    kind: str | None  # "run", "skip" or None (no marker)
    reason: str = ""
    timeout: float = 120
    append: list[str] = field(default_factory=list)
    needs: str = ""

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_marker(text: str) -> dict:
    m = MARKER.search(text)
    if not m:
        return {"kind": None}
    rest = m.group("rest").strip()
    if m.group("kind") == "skip":
        reason = rest[1:-1].strip() if rest.startswith("(") and rest.endswith(")") else ""
        return {"kind": "skip", "reason": reason}
    opts = dict(token.split("=", 1) for token in shlex.split(rest))
    unknown = set(opts) - {"timeout", "append", "needs"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in marker {m.group(0)!r}")
    if opts.get("needs", "shared-data") not in NEEDS:
        raise ValueError(f"needs={opts['needs']!r} in marker {m.group(0)!r}: known needs are {sorted(NEEDS)}")
    return {
        "kind": "run",
        "timeout": float(opts.get("timeout", 120)),
        "append": shlex.split(opts.get("append", "")),
        "needs": opts.get("needs", ""),
    }


def fenced_blocks(path: Path) -> list[tuple[str, int, str, str]]:
    """(language, line of the opening fence, code, the text before the fence) of every fenced block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((fence[3:].strip(), i + 1, "\n".join(lines[i + 1 : end]), prev))
            i = end + 1
        else:
            i += 1
    return blocks


def doc_name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def bash_blocks(path: Path) -> list[Block]:
    return [
        Block(doc_name(path), line, code, **parse_marker(prev))
        for lang, line, code, prev in fenced_blocks(path)
        if lang in ("bash", "sh", "shell")
    ]


def all_blocks() -> list[Block]:
    return [b for doc in DOCS if doc.exists() for b in bash_blocks(doc)]


def commands(code: str) -> list[list[str]]:
    """The shell commands of a block, each as tokens: continuations joined, comments and prompts dropped."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)  # a copied "$ " prompt
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if tokens:
            out.append(tokens)
    return out


def invocations(tokens: list[str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """(program, args) for every xpeft / ray_jobs / benchmarks call in one command line. program is ("xpeft",),
    ("ray_jobs/NAME.py",) or ("benchmarks/NAME.py",); args run to the next shell separator."""
    found = []
    for i, tok in enumerate(tokens):
        prog = None
        if Path(tok).name == "xpeft" and (i == 0 or tokens[i - 1] in SEPARATORS | {"--", "env", "time"}):
            prog = ("xpeft",)
        elif Path(tok).name.startswith("python") and i + 1 < len(tokens) and tokens[i + 1].startswith(SCRIPT_DIRS):
            prog = (tokens[i + 1],)
        if prog is None:
            continue
        start = i + 1 if prog == ("xpeft",) else i + 2
        end = next(
            (j for j in range(start, len(tokens)) if tokens[j] in SEPARATORS or tokens[j][:1] in "<>"), len(tokens)
        )
        found.append((prog, tokens[start:end]))
    return found


# --- help text, shared by the checks ------------------------------------------------------------------


def xpeft_help(path: tuple[str, ...]) -> tuple[int, str]:
    """Run `xpeft PATH... --help` in this process (a subprocess per subcommand costs seconds each)."""
    from xpeft.cli import main

    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main([*path, "--help"])
        except SystemExit as e:
            code = e.code or 0
    return code, buf.getvalue()


def xpeft_subcommands() -> list[tuple[str, ...]]:
    """Every path of subcommands in the `xpeft` parser, e.g. ("bank", "random")."""
    import argparse

    from xpeft.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield prefix + (name,)
                    yield from walk(sub, prefix + (name,))

    return list(walk(build_parser(), ()))


def split_xpeft_args(args: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """The subcommand path at the front of an xpeft call, and the rest."""
    known = set(xpeft_subcommands())
    path: tuple[str, ...] = ()
    for a in args:
        if path + (a,) in known:
            path += (a,)
        else:
            break
    return path, args[len(path) :]


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def test_the_convention_parses_markers_blocks_and_commands(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        '<!-- test: run timeout=30 append="--epochs 1" -->\n\n```bash\n'
        "xpeft params --N 100 \\\n    --b 8 | head -3  # a comment\necho '#1 | ;'\n```\n"
        "<!-- test: skip (needs AWS) -->\n```bash\nray job submit --working-dir . -- "
        "python ray_jobs/fit_profiles.py --data s3://b/p.parquet > log\n```\n"
        "```bash\nxpeft bank info x\n```\n```text\nxpeft is not run\n```\n"
    )
    blocks = bash_blocks(doc)
    assert len(blocks) == 3  # the text block is not a command block
    run, skip, bare = blocks
    assert (run.kind, run.timeout, run.append) == ("run", 30, ["--epochs", "1"])
    assert (skip.kind, skip.reason, bare.kind) == ("skip", "needs AWS", None)
    assert [inv for c in commands(run.code) for inv in invocations(c)] == [
        (("xpeft",), ["params", "--N", "100", "--b", "8"])
    ]
    assert [inv for c in commands(skip.code) for inv in invocations(c)] == [
        (("ray_jobs/fit_profiles.py",), ["--data", "s3://b/p.parquet"])
    ]
    assert with_appended_flags(run.code, run.append).splitlines() == [
        "xpeft params --N 100 --b 8 --epochs 1 | head -3  # a comment",
        "echo '#1 | ;'",
    ]


# --- 1. every command's --help --------------------------------------------------------------------------


def test_xpeft_console_script_help_exits_0():
    r = subprocess.run([str(BIN / "xpeft"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: xpeft" in r.stdout, r.stderr


@pytest.mark.parametrize("path", xpeft_subcommands(), ids=" ".join)
def test_every_xpeft_subcommand_help_exits_0(path):
    code, text = xpeft_help(path)
    assert code == 0 and "usage:" in text, text


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_ray_jobs_script_help_exits_0(script):
    code, text = script_help(f"ray_jobs/{script}")
    assert code == 0 and "usage:" in text, text


# --- 2. the docs' bash blocks ----------------------------------------------------------------------------


def test_the_docs_exist_and_every_bash_block_is_marked():
    if not (REPO / "README.md").exists():
        pytest.fail("README.md is missing: the newcomer's path starts there")
    unmarked = [b.name for b in all_blocks() if b.kind is None]
    assert not unmarked, (
        f"bash blocks without a <!-- test: run --> or <!-- test: skip (reason) --> marker on "
        f"the line before the fence: {unmarked}"
    )
    no_reason = [b.name for b in all_blocks() if b.kind == "skip" and not b.reason]
    assert not no_reason, f"skip markers need a reason, as in <!-- test: skip (needs a GPU) -->: {no_reason}"


def check_invocation(prog: tuple[str, ...], args: list[str]) -> str | None:
    """Why a documented call would fail at once (a missing command or script, an unknown flag), or None."""
    if prog == ("xpeft",):
        path, rest = split_xpeft_args(args)
        code, text = xpeft_help(path)
        name = " ".join(("xpeft", *path))
    else:
        name, rest = prog[0], args
        if not (REPO / name).exists():
            return f"{name} does not exist"
        code, text = script_help(name)
    if code != 0:
        return f"`{name} --help` failed:\n{text}"
    helped = set(re.findall(r"--[A-Za-z0-9][-A-Za-z0-9_]*", text))
    unknown = [f for f in flags(rest) if f not in helped]
    return f"`{name}` has no option(s) {unknown} (see `{name} --help`)" if unknown else None


def documented_invocations() -> list:
    return [
        pytest.param(prog, args, id=f"{b.name} {' '.join(prog + tuple(args))}"[:90])
        for b in all_blocks()
        for tokens in commands(b.code)
        for prog, args in invocations(tokens)
    ]


@pytest.mark.parametrize("prog,args", documented_invocations())
def test_documented_commands_exist_and_use_only_their_flags(prog, args):
    assert check_invocation(prog, args) is None, check_invocation(prog, args)


def test_the_flag_check_catches_rot():
    assert check_invocation(("xpeft",), ["params", "--N", "100"]) is None
    assert "--bogus" in check_invocation(("xpeft",), ["params", "--bogus", "1"])
    assert "--bogus" in check_invocation(("ray_jobs/fit_profiles.py",), ["--demo", "--bogus"])
    assert "does not exist" in check_invocation(("ray_jobs/nope.py",), [])


def documented_make_targets() -> list:
    targets = {
        (b.name, t)
        for b in all_blocks()
        for tokens in commands(b.code)
        for i, tok in enumerate(tokens)
        if tok == "make" and (i == 0 or tokens[i - 1] in SEPARATORS)
        for t in tokens[i + 1 :]
        if not t.startswith("-") and "=" not in t
    }
    return [pytest.param(t, id=f"{where} make {t}") for where, t in sorted(targets)]


@pytest.mark.parametrize("target", documented_make_targets())
def test_documented_make_targets_exist(target):
    """`make -n` only prints what the target would run: it fails at once for a target the Makefile lacks."""
    r = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"make has no target {target!r}: {r.stderr}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of the repository (no .venv, .git or outputs) for the docs' commands to run in."""
    dst = tmp_path_factory.mktemp("docs") / "repo"
    shutil.copytree(
        REPO,
        dst,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"
        ),
    )
    return dst


def shell_pieces(line: str) -> list[str]:
    """`line` cut at unquoted separators (|, ||, &&, ;, &, redirections) and before a comment, as
    alternating [command, separator, command, ...] pieces that join back to the line."""
    pieces, cur, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "\\":
            cur += line[i : i + 2]
            i += 2
            continue
        elif ch == "#" and (not cur or cur[-1].isspace()):
            pieces += [cur, line[i:]]
            return pieces
        elif ch in "|;&<>":
            j = i
            while j < len(line) and line[j] in "|;&<>":
                j += 1
            pieces += [cur, line[i:j]]
            cur, i = "", j
            continue
        cur += ch
        i += 1
    return pieces + [cur]


def with_appended_flags(code: str, extra: list[str]) -> str:
    """Append `extra` to each xpeft / ray_jobs command of the block (before any pipe, redirection or
    comment on its line); continuation lines are joined first."""
    if not extra:
        return code
    out = []
    for line in re.sub(r"\s*\\\n\s*", " ", code).splitlines():
        pieces = shell_pieces(line)
        for k in range(0, len(pieces), 2):  # the commands; odd pieces are separators and comments
            try:
                calls = invocations(shlex.split(pieces[k]))
            except ValueError:
                calls = []
            if calls:
                body = pieces[k].rstrip()
                pieces[k] = f"{body} {shlex.join(extra)}{pieces[k][len(body) :] or ' '}"
        out.append("".join(pieces))
    return "\n".join(out)


def pending(block: Block) -> list[str]:
    """The benchmarks the block runs that have no smoke setting yet (tests/test_benchmarks.py's PENDING)."""
    progs = {prog[0] for tokens in commands(block.code) for prog, _ in invocations(tokens)}
    return sorted(name for name in PENDING if f"benchmarks/{name}" in progs)


def benchmark_calls(block: Block) -> list[tuple[str, list[str]]] | None:
    """A block of nothing but `python benchmarks/NAME.py ...` lines, appended --smoke: (NAME.py, args) each, run
    through tests/test_benchmarks.py's run_smoke (the same run once, however many commands make it); None for
    any other block, which runs as a bash script."""
    if block.append != ["--smoke"]:
        return None
    calls = []
    for tokens in commands(block.code):
        found = invocations(tokens)
        if len(found) != 1 or not Path(tokens[0]).name.startswith("python") or len(tokens) != 2 + len(found[0][1]):
            return None
        (prog, args), *_ = found
        if not prog[0].startswith("benchmarks/"):
            return None
        calls.append((prog[0].removeprefix("benchmarks/"), args))
    return calls or None


def run_params(benchmarks: bool) -> list:
    """The run blocks: those of nothing but benchmark commands (`benchmarks`), or all the others."""
    params = []
    for b in all_blocks():
        if b.kind != "run" or (benchmark_calls(b) is not None) != benchmarks:
            continue
        waiting = pending(b)
        marks = (
            [pytest.mark.xfail(strict=True, reason=f"{', '.join(waiting)}: {PENDING[waiting[0]]}")] if waiting else []
        )
        params.append(pytest.param(b, id=b.name, marks=marks))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("block", run_params(benchmarks=False))
def test_runnable_doc_blocks_exit_0(block, scratch):
    """In document order, in one scratch copy: a block sees what the blocks before it wrote."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    if block.needs == "shared-data":
        env["XPEFT_DATA_DIR"] = str(shared_data_dir())  # skips, saying why, where it is absent
    script = "set -euo pipefail\n" + with_appended_flags(block.code, block.append)
    code, out, err = run_block(script, scratch, env, block.timeout)
    assert code == 0, f"{block.name} exited {code}:\n{script}\n{out[-4000:]}\n{err[-4000:]}"


@pytest.mark.slow
class TestBenchmarkBlocks:
    """The blocks of nothing but `python benchmarks/...` commands, each run smoke-sized from the checkout through
    tests/test_benchmarks.py's run_smoke (shared with its runs). A class of their own: `make test`'s workers
    (pytest-xdist, --dist loadscope) take it apart from the scratch blocks above, which must keep their order."""

    @pytest.mark.parametrize("block", run_params(benchmarks=True))
    def test_benchmark_blocks_run_smoke_sized(self, block):
        for script, args in benchmark_calls(block):
            r = run_smoke(script, args)
            assert_ran(r)
            assert not stages_missing(script, args, r.stdout), f"{script} {args}: no output of these stages"


def run_block(script: str, cwd: Path, env: dict, timeout: float) -> tuple[int | str, str, str]:
    """Run a block as a bash script in a session of its own: (exit status, stdout, stderr). Whatever it left
    running (a server it started in the background and never reached the line that stops, because an earlier
    line failed) is killed when bash exits, so a failing block fails at once instead of at its timeout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"nothing: still running after {timeout:.0f} s"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        err.seek(0)
        return code, out.read(), err.read()


# --- 3. names in the docs that can rot besides commands ---------------------------------------------------


def test_commands_live_only_in_marked_bash_blocks():
    """A command in a ```text (or unlabelled) block is neither run nor checked: commands go in ```bash blocks,
    their output in ```text blocks of its own."""
    found = [
        f"{doc_name(doc)}:{line}: {' '.join(tokens)[:80]}"
        for doc in DOCS
        if doc.exists()
        for lang, line, code, _ in fenced_blocks(doc)
        if lang not in ("bash", "sh", "shell")
        for tokens in commands(code)
        if invocations(tokens)
    ]
    assert not found, f"commands outside ```bash blocks (move them into a marked ```bash block): {found}"


LEFT = re.compile(r"benchmarks/(\w+\.py)")
COMMIT = re.compile(r"\bcommit ([0-9a-f]{7,40})\b")


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def commit_has(commit: str, path: str) -> bool:
    r = subprocess.run(["git", "cat-file", "-e", f"{commit}:{path}"], cwd=REPO, capture_output=True, timeout=60)
    return r.returncode == 0


def test_a_benchmark_that_left_the_tree_is_named_with_the_commit_that_has_it():
    """One-off experiments leave benchmarks/ and their numbers stay in the docs: a paragraph naming a script
    that is gone must say at which commit it ran (`... at commit 1b95322`), and that commit must hold it."""
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("not a full git checkout (none, or a shallow clone): the commits named cannot be looked up")
    bad = []
    for doc in DOCS:
        for para in paragraphs(doc.read_text()) if doc.exists() else []:
            for name in sorted(set(LEFT.findall(para))):
                if (REPO / "benchmarks" / name).exists():
                    continue
                commits = COMMIT.findall(para)
                if not any(commit_has(c, f"benchmarks/{name}") for c in commits):
                    bad.append(f"{doc_name(doc)}: benchmarks/{name} (commits named: {commits or 'none'})")
    assert not bad, f"gone from benchmarks/, and named without a commit that has it: {bad}"


DOTTED = re.compile(r"\bxpeft(?:\.[A-Za-z_]\w*)+")


def resolves(name: str) -> bool:
    """`xpeft.a.b.c` names a module, or an attribute of the longest module prefix that imports."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_every_dotted_xpeft_name_in_the_docs_resolves():
    """`xpeft.recipes.TASK_TRAIN` after the recipes moved to xpeft.fit.recipes is a dead end for a reader."""
    names = {(doc_name(doc), m) for doc in DOCS if doc.exists() for m in DOTTED.findall(doc.read_text())}
    dead = sorted(f"{doc}: {name}" for doc, name in names if not resolves(name))
    assert not dead, f"names that no longer exist: {dead}"
