"""Every flag of every entry point says what it is and its default, and is the name of the field it sets: each
`xpeft` subcommand's and each `ray_jobs/` script's (the scripts build their parsers from xpeft.jobs.JOBS). Flags
made from config fields carry the field's name, help and default (xpeft.flags); the hand-written ones must too."""

from __future__ import annotations

import argparse

import pytest

from xpeft.cli import build_parser
from xpeft.jobs import JOBS


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) for the `xpeft` command, each of its subcommands, and each job script's parser."""
    found = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")

    walk(build_parser(), "xpeft")
    for name, job in JOBS.items():
        ap = argparse.ArgumentParser()
        job.arguments(ap)
        found.append((f"ray_jobs {name}", ap))
    return found


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The flags of `parser` without help, and the optional ones whose help does not state their default."""
    bad = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue  # (a suppressed flag is an old name, refused with the new one: tests/test_names.py)
        name = "/".join(action.option_strings) or action.dest
        text = (action.help or "").strip()
        if not text or text.upper() in (action.dest.upper(), str(action.metavar).upper()):
            bad.append(f"{name}: no help")
        elif action.option_strings and not action.required and "default" not in text:
            bad.append(f"{name}: its help does not say its default ({text!r})")
    return bad


PARSERS = parsers()


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_flag_says_what_it_is_and_its_default(name, parser):
    assert not undocumented(parser), f"`{name} --help`: {undocumented(parser)}"


def renamed_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The flags of `parser` not named as the field (dest) they set: `--replicas` for num_replicas, say."""
    bad = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = action.dest.replace("_", "-")
        if not {f"--{name}", f"--no-{name}"} & set(action.option_strings):
            bad.append(f"{'/'.join(action.option_strings)} sets {action.dest}")
    return bad


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_flag_is_the_name_of_the_field_it_sets(name, parser):
    assert not renamed_flags(parser), f"`{name}`: {renamed_flags(parser)}"


def test_the_name_check_catches_a_flag_named_otherwise():
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", dest="num_replicas", type=int, help="replicas (default: 1)")
    ap.add_argument("--num-actors", type=int, help="actors (default: 1)")
    assert renamed_flags(ap) == ["--replicas sets num_replicas"]


def test_the_help_check_catches_a_bare_flag():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=100)
    ap.add_argument("--k", type=int, default=50, help="adapters a hard mask selects")
    ap.add_argument("--b", type=int, default=48, help="b, the bottleneck (default: 48)")
    assert undocumented(ap) == [
        "--N: no help",
        "--k: its help does not say its default ('adapters a hard mask selects')",
    ]


def test_every_job_has_a_script_and_a_subcommand():
    from pathlib import Path

    scripts_dir = Path(__file__).resolve().parents[1] / "ray_jobs"
    scripts = {p.read_text().split('main("')[-1].split('"')[0] for p in scripts_dir.glob("*.py")}
    assert set(JOBS) == scripts
    assert {n.split()[1] for n, _ in PARSERS if n.startswith("xpeft ") and len(n.split()) == 2} >= set(JOBS)
