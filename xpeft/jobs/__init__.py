"""The jobs, one module each (as torchtune has one recipe per file), each a function over the library with flags
generated from its configs (xpeft.flags): `xpeft fit-profiles | fit-task | tune | serve | classify-batch` and
`python ray_jobs/<job>.py` are the same code.

    fit_profiles.py    the profile farm            fit_task.py        one fit with Ray Train
    tune.py            Appendix C's search         serve.py           the HTTP server (Ray Serve)
    classify_batch.py  a table scored with Ray Data

Each module has `HELP`, `arguments(parser)` and `run(args)`. Without RAY_ADDRESS a job starts an embedded local Ray;
under `ray job submit` it joins the cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType

from xpeft.jobs import classify_batch, fit_profiles, fit_task, serve, tune

JOBS: dict[str, ModuleType] = {
    "fit-profiles": fit_profiles,
    "fit-task": fit_task,
    "tune": tune,
    "serve": serve,
    "classify-batch": classify_batch,
}


def run(job: str, args: argparse.Namespace) -> None:
    """Run a parsed job; a refusal (bad input, a missing file) is one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        JOBS[job].run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{job}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(job: str, argv: list[str] | None = None, doc: str | None = None) -> None:
    """`python ray_jobs/<job>.py ...`: the job's flags and run, as `xpeft <job> ...`."""
    ap = argparse.ArgumentParser(
        description=doc or JOBS[job].HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    JOBS[job].arguments(ap)
    run(job, ap.parse_args(argv))
