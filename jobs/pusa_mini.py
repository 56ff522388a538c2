"""Train pusa-mini from scratch with our own jobs, and ship it (`make pusa-mini`).

    python jobs/pusa_mini.py                  # every stage, each skipped once its output exists
    python jobs/pusa_mini.py --stage base     # one stage (data, preprocess, base, vta, package, evaluate)

The stages are pusa_ray/mini/recipe.py; everything goes under out/pusa-mini/ until `package`
copies the final weights into pusa_ray/weights/pusa-mini/.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from pusa_ray.mini.recipe import main
except ModuleNotFoundError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pusa_ray.mini.recipe import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
