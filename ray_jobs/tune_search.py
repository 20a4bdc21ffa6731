"""The paper's hyper-parameter search (Appendix C) with Ray Tune and ASHA on the task's official score.

    python ray_jobs/tune_search.py --task rte --recipe task --epochs 3 --num-samples 12
    python ray_jobs/tune_search.py --task sst2 --train-subset 2000 --search N k --space-N 100 200 \
        --space-k 10 50 --grid --name sst2-Nk --store runs/store
    python ray_jobs/tune_search.py --task sst2 --train-subset 2000 --search N k --space-N 100 200 \
        --space-k 10 50 --grid --name sst2-Nk --restore          # continue an interrupted search

Searched by default: N ∈ {100, 200, 400, 800}, k ∈ {1, 10, …, 100}, b ∈ {12, 24, 48, 96}, batch size ∈
{8, …, 128}; `--search` picks the dimensions and `--space-X` narrows one (the rest come from the fit flags).
Each trial is a single-process fit, or a Ray Train run over --num-workers workers with --distributed.
The best config goes to <storage-path>/<name>/best.json and, with --store, its profile to the store.

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The job is xpeft.jobs.tune's (also `xpeft tune`); this script only calls it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # `ray job submit --working-dir .`

from xpeft.jobs import main  # noqa: E402

if __name__ == "__main__":
    main("tune", doc=__doc__)
