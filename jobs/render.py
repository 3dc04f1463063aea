"""Entry point for `ray job submit`: render a batch spec on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/render.py jobs/batches/ads.yaml --out s3://bucket/renders/spring-ads
    python jobs/render.py jobs/batches/ads.yaml --workers 2      # CPU-sized: a local Ray

Thin on purpose: the arguments are those of `vidgen render` (a spec, --out, --model, --workers,
--dry-run); exit 0 when every item rendered, 1 when some failed (named), 2 for a wrong spec.
"""

import sys

from vidgen.jobs.entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("render", sys.argv[1:]))
