"""`pusa-ray client`: submit, poll and download jobs of a running service, for people without curl."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pusa_ray.cli.flags import add_generation_flags, parse_cond
from pusa_ray.errors import UserInputError


def media(source: str) -> dict[str, str]:
    """A local file becomes inline base64 data; an s3:// URI is passed by reference."""
    if source.startswith("s3://"):
        return {"uri": source}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {source!r}")
    return {"data": base64.b64encode(path.read_bytes()).decode()}


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/videos body from `generate`-style flags."""

    body: dict[str, Any] = {"task": args.task, "prompt": args.prompt, "seed": args.seed}
    fields = (
        "negative_prompt",
        "frames",
        "height",
        "width",
        "steps",
        "guidance",
        "shift",
        "schedule",
        "cache",
    )
    fields += ("fps",)
    for name in fields:
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    for name in ("cond_frames", "end_frames", "adapter"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.adapter_alpha is not None:
        body["adapter_alpha"] = args.adapter_alpha
    if args.noise:
        body["noise"] = list(args.noise)
    for name in ("image", "end_image", "video", "end_video"):
        if getattr(args, name):
            body[name] = media(getattr(args, name))
    if args.cond:
        body["keyframes"] = [
            {"position": position, "image": media(path), "noise": noise}
            for position, path, noise in map(parse_cond, args.cond)
        ]
    return body


class Client:
    """The service's HTTP API. A service that is not answering yet (just deployed, restarting) or
    answers 502/503 (starting, storage unreachable) is retried for up to `patience_s`; a submit
    carries an Idempotency-Key, so a retried one never makes a second job."""

    def __init__(self, url: str, api_key: str | None, patience_s: float = 120.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.patience_s = patience_s
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        deadline = time.time() + self.patience_s
        told = False
        while True:
            try:
                response = self.session.request(method, f"{self.url}{path}", **kwargs)
                waiting = response.status_code in (502, 503) or _not_ours(response)
                reason = f"HTTP {response.status_code}"
            except requests.ConnectionError as error:
                response, waiting, reason = None, True, type(error).__name__
            if not waiting or time.time() > deadline:
                if response is None:
                    raise UserInputError(f"no service answers at {self.url} ({reason})")
                return self._check(response)
            if not told:
                print(f"waiting for the service at {self.url} ({reason}) ...", file=sys.stderr, flush=True)
                told = True
            retry_after = response.headers.get("Retry-After") if response is not None else None
            time.sleep(min(float(retry_after) if retry_after and retry_after.isdigit() else 2.0, 10.0))

    def _check(self, response: Any) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = error["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise UserInputError(f"HTTP {response.status_code}: {message}")
        return response

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key or f"pusa-ray-client-{uuid.uuid4().hex}"}
        return self._request("POST", "/v1/videos", json=body, headers=headers, timeout=120).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/videos/{job_id}", timeout=60).json()

    def wait(self, job_id: str, poll_s: float = 2.0, timeout_s: float = 3600.0) -> dict[str, Any]:
        deadline = time.time() + timeout_s
        while True:
            view = self.status(job_id)
            print(
                f"\r{job_id} {view['status']} {view['progress']:5.1f}%", end="", file=sys.stderr, flush=True
            )
            if view["status"] in ("completed", "failed", "cancelled") or time.time() > deadline:
                print(file=sys.stderr)
                return view
            time.sleep(poll_s)

    def download(self, job_id: str, out: Path, variant: str = "video") -> Path:
        response = self._request(
            "GET", f"/v1/videos/{job_id}/content", params={"variant": variant}, timeout=600
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(response.content)
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/videos/{job_id}", timeout=60).json()

    def list(self, limit: int = 20) -> dict[str, Any]:
        return self._request("GET", "/v1/videos", params={"limit": limit}, timeout=60).json()


def _not_ours(response: Any) -> bool:
    """A 404 that is not the API's own JSON error: Serve's proxy before the app's routes are up."""
    if response.status_code != 404:
        return False
    try:
        return "error" not in response.json()
    except ValueError:
        return True


def _add_connection_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    """--url and --api-key; on each action without defaults, so that they may come before the
    action (`client --url U submit`) or after it (`client submit --url U`)."""
    url = os.environ.get("PUSA_RAY_URL", "http://127.0.0.1:8000") if with_defaults else argparse.SUPPRESS
    key = os.environ.get("PUSA_RAY_API_KEY") if with_defaults else argparse.SUPPRESS
    parser.add_argument("--url", default=url, help="the service (default: $PUSA_RAY_URL or 127.0.0.1:8000)")
    parser.add_argument("--api-key", default=key, help="default: $PUSA_RAY_API_KEY")


def add_parser(commands: argparse._SubParsersAction) -> None:
    client = commands.add_parser("client", help="talk to a running pusa-ray service over HTTP")
    _add_connection_flags(client, with_defaults=True)
    actions = client.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="submit a job (flags as for generate)")
    add_generation_flags(submit, service=True)
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="poll until it ends, then download to --out")
    submit.add_argument("--out", type=Path, help="with --wait: where to write the mp4")
    for name in ("status", "cancel"):
        actions.add_parser(name).add_argument("job_id")
    download = actions.add_parser("download")
    download.add_argument("job_id")
    download.add_argument("--out", type=Path, required=True)
    download.add_argument("--variant", choices=["video", "latents", "thumbnail"], default="video")
    actions.add_parser("list").add_argument("--limit", type=int, default=20)
    for action in actions.choices.values():
        _add_connection_flags(action, with_defaults=False)


def run_client(args: argparse.Namespace) -> None:
    client = Client(args.url, args.api_key)
    if args.action == "submit":
        view = client.submit(request_body(args), args.idempotency_key)
        if args.wait:
            view = client.wait(view["id"])
            if view["status"] == "completed" and args.out:
                client.download(view["id"], args.out)
        print(json.dumps(view, indent=2))
        if view["status"] in ("failed", "cancelled"):
            raise UserInputError(f"job {view['id']} {view['status']}: {view.get('error')}")
    elif args.action == "status":
        print(json.dumps(client.status(args.job_id), indent=2))
    elif args.action == "download":
        print(f"wrote {client.download(args.job_id, args.out, args.variant)}")
    elif args.action == "cancel":
        print(json.dumps(client.cancel(args.job_id), indent=2))
    elif args.action == "list":
        print(json.dumps(client.list(args.limit), indent=2))
