"""Entry point for `ray job submit`: train from a YAML config on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py jobs/train/gan-gpu.yaml --set max_steps=1000

Thin on purpose: the arguments are those of `vidgen train` (a config file, flags, --set).
"""

import sys

from vidgen.jobs.entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
