"""Score a table of texts, each row with its profile, on a Ray Data actor pool of profile engines.

    python ray_jobs/classify_batch.py --data texts.parquet --store runs/news --out runs/scored
    ray job submit --working-dir . -- python ray_jobs/classify_batch.py --data s3://bucket/texts/ \
        --store s3://bucket/xpeft-store --out s3://bucket/scored/ --num-actors 8

The table has columns text, profile_id (optional id, text_pair); the output is the same rows with label,
label_name, probabilities, value, profile_created and error (rows that could not be scored say why there). Without
RAY_ADDRESS it starts an embedded local Ray; under `ray job submit` it joins the cluster. The job is
xpeft.jobs.classify_batch's (also `xpeft classify-batch`); this script only calls it.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # `ray job submit --working-dir .`

from xpeft.jobs import main  # noqa: E402

if __name__ == "__main__":
    main("classify-batch", doc=__doc__)
