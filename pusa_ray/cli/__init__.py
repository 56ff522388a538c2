"""`pusa-ray`: the command line. Bad input ends with one line on stderr and exit status 2.

flags.py     what to generate: the flags shared by `generate` and `client submit`
generate.py  `pusa-ray generate` (one video on this machine)
client.py    `pusa-ray client ...` (a running service, over HTTP)
jobs.py      the Ray jobs, `sample-data` and `convert`
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pusa_ray.cli import client, generate, jobs
from pusa_ray.cli.flags import Parser
from pusa_ray.errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pusa-ray", description="Vectorized-timestep video diffusion (Pusa).")
    commands = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(commands)
    client.add_parser(commands)
    jobs.add_parsers(commands)
    return parser


RUNS = {
    "generate": generate.run_generate,
    "client": client.run_client,
    "sample-data": jobs.run_sample_data,
    "convert": jobs.run_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in jobs.DELEGATED:
        return jobs.run_delegated(argv)
    args = build_parser().parse_args(argv)
    try:
        RUNS[args.command](args)
    except (UserInputError, FileNotFoundError, ValueError, OSError) as error:
        if os.environ.get("PUSA_RAY_DEBUG"):
            raise
        print(f"pusa-ray: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
