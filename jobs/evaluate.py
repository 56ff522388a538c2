"""Job: generate videos for a held-out set of shape clips with one or more models and score them.

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --model base=pusa-mini-base --model pusa-mini=pusa-mini --steps 2,5,10,20 --out out/eval

Plain Python (no Ray needed); the evaluation itself is pusa_ray/mini/evaluate.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from pusa_ray.mini.evaluate import main
except ModuleNotFoundError:  # run from a checkout (a `--working-dir .` job) without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pusa_ray.mini.evaluate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
