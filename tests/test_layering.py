"""The core knows nothing of Ray: importing the core modules never pulls in `ray` or `deepspeed`;
and the job modules import Ray only once they have work to run. (The one such test of the suite.)"""

import json
import subprocess
import sys

CORE_MODULES = [
    "pusa_ray.config",
    "pusa_ray.timesteps",
    "pusa_ray.flow",
    "pusa_ray.conditioning",
    "pusa_ray.sampler",
    "pusa_ray.step_cache",
    "pusa_ray.sequence_parallel",
    "pusa_ray.parallel_launch",
    "pusa_ray.models.speed",
    "pusa_ray.models.vta",
    "pusa_ray.models.codec",
    "pusa_ray.models.text",
    "pusa_ray.models.loading",
    "pusa_ray.video",
    "pusa_ray.checkpoints.lora",
    "pusa_ray.checkpoints.wan_original",
    "pusa_ray.checkpoints.adapters",
    "pusa_ray.storage",
    "pusa_ray.convert",
    "pusa_ray.cli.client",
    "pusa_ray.cli.flags",
    "pusa_ray.names",
    "pusa_ray.video_request",
    "pusa_ray.data.latents",
    "pusa_ray.training.config",
    "pusa_ray.training.data",
    "pusa_ray.training.model",
    "pusa_ray.training.objective",
    "pusa_ray.training.checkpoint",
    "pusa_ray.training.preflight",
    "pusa_ray.training.export",
    "pusa_ray.preprocessing.config",
    "pusa_ray.models.description",
    "pusa_ray.preprocessing.plan",
    "pusa_ray.preprocessing.decode",
    "pusa_ray.preprocessing.commit",
    "pusa_ray.tasks",
    "pusa_ray.pipeline",
    "pusa_ray.cli",
    "pusa_ray.mini.shapes",
    "pusa_ray.mini.metrics",
    "pusa_ray.mini.evaluate",
    "pusa_ray.mini.sample_data",
]

# Job modules whose Ray parts are imported when they run, so that their plans and checks need none.
LAZY_RAY_MODULES = ["pusa_ray.distributed.preprocess"]

# One fresh interpreter imports the modules in turn and records what each one brought in.
PROBE = """
import importlib, json, sys
seen = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    seen[name] = [m for m in ("ray", "deepspeed") if m in sys.modules]
print(json.dumps(seen))
"""


def test_core_modules_do_not_import_ray():
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *CORE_MODULES, *LAZY_RAY_MODULES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen == {name: [] for name in CORE_MODULES + LAZY_RAY_MODULES}
