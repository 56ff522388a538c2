"""Ray job: encode raw videos and captions into a latent dataset (Ray Data).

    ray job submit --working-dir . -- python jobs/preprocess.py --config jobs/configs/preprocess.tiny.yaml

The job attaches to the cluster it runs on (`ray.init()` without arguments, only once there is
something to encode), shows Ray Data's progress, and ends with one summary line: clips written,
skipped and already present, and clips/s. Exit status 2 means a bad config or input (one line on
stderr, before any Ray work). See pusa_ray/distributed/preprocess.py and docs/shard-format.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from pusa_ray.distributed.preprocess import main
except ModuleNotFoundError:  # run from a checkout (a `--working-dir .` job) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pusa_ray.distributed.preprocess import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
