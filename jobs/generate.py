"""Batch generation: `ray job submit --working-dir . -- python jobs/generate.py --config C.yaml`."""

import sys

from pusa_ray.distributed.batch import main

if __name__ == "__main__":
    sys.exit(main())
