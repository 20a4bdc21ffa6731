"""Fit one X-PEFT profile per profile_id into a profile store: the profile farm's main job.

    python ray_jobs/fit_profiles.py --demo                       # bundled sample, embedded local Ray
    python ray_jobs/fit_profiles.py --data news --setting mtl --store runs/news
    ray job submit --working-dir . -- python ray_jobs/fit_profiles.py --data s3://bucket/profiles.parquet \
        --store s3://bucket/xpeft-store

Without RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster.
The job is xpeft.jobs.fit_profiles's (also `xpeft fit-profiles`); this script only calls it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # `ray job submit --working-dir .`

from xpeft.jobs import main  # noqa: E402

if __name__ == "__main__":
    main("fit-profiles", doc=__doc__)
