"""Ray job: fine-tune the Pusa VTA DiT on a latent dataset (Ray Train + DeepSpeed ZeRO-2).

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train.tiny.yaml

The job attaches to the cluster it runs on (`ray.init()` without arguments), checks the config and
the dataset before any worker starts, logs a progress line per step (rank 0), and ends with one
summary line: steps, samples/s, probe loss before and after, restarts, final checkpoint and the
exported adapter. Exit status 2: a bad config or input (one line on stderr, nothing started);
1: training failed. Rerunning with the same run name and storage path resumes the run. See
pusa_ray/distributed/train.py and docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from pusa_ray.distributed.train import main
except ModuleNotFoundError:  # run from a checkout (a `--working-dir .` job) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pusa_ray.distributed.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
