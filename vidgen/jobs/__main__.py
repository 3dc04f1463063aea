"""`python -m vidgen.jobs run KIND ...`: a job's entrypoint on the cluster (see vidgen.jobs.entry)."""

import sys

from vidgen.jobs.entry import main

if __name__ == "__main__":
    sys.exit(main())
