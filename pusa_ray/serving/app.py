"""The Ray Serve application: a light HTTP ingress and an autoscaling GPU generator.

    ingress.py    routes (validation, auth, views); storage waits bounded, 503 when it is down
    dispatch.py   one pending generator call per job, attempts that supersede, the janitor
    generator.py  the GPU deployment: runs one attempt of a job at a time
    execute.py    one attempt with the core pipeline (no Ray): progress, heartbeat, fenced writes
    jobs.py       the job store: records, per-attempt states and outputs

Entry point for Serve configs: `import_path: pusa_ray.serving.app:build_app`, `args:` = settings.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from pusa_ray.serving.generator import Generator
from pusa_ray.serving.ingress import Ingress
from pusa_ray.serving.settings import ServiceSettings


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: `args` are the ServiceSettings (validated here and on each replica)."""
    settings = ServiceSettings.model_validate(args).model_dump(mode="json")
    return Ingress.bind(Generator.bind(settings), settings)
