"""`treadle deploy create|list|promote|rollback|history` and `treadle traces export`: a client of the deployment
REST API over HTTP (like the SDK, it never imports the server), pointed at a server by `--base-url` /
`TINKER_BASE_URL` with `--api-key` / `TINKER_API_KEY`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    pass


def _client(args: argparse.Namespace) -> Any:
    import httpx

    url = (args.base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_URL).rstrip("/")
    key = args.api_key or os.environ.get("TINKER_API_KEY") or "tml-local"
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=args.timeout)


def _call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    import httpx

    with _client(args) as c:
        try:
            r = c.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach {c.base_url}: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text}
    if r.status_code >= 400:
        detail = body.get("detail", body) if isinstance(body, dict) else body
        raise ApiError(f"{r.status_code}: {detail}")
    return body


def _line(d: dict[str, Any]) -> str:
    return f"{d['name']}  v{d['version']}  {d['model_path']}  (updated {d['updated_at']})"


def _create(args: argparse.Namespace) -> None:
    d = _call(args, "POST", "/api/v1/deployments", json={"name": args.name, "model_path": args.model_path})
    print(_line(d))


def _list(args: argparse.Namespace) -> None:
    deps = _call(args, "GET", "/api/v1/deployments")["deployments"]
    if not deps:
        print("no deployments")
    for d in deps:
        print(_line(d))


def _promote(args: argparse.Namespace) -> None:
    body = {"model_path": args.model_path, "reason": args.reason}
    print(_line(_call(args, "POST", f"/api/v1/deployments/{args.name}/promote", json=body)))


def _rollback(args: argparse.Namespace) -> None:
    body = {"version": args.version, "reason": args.reason}
    print(_line(_call(args, "POST", f"/api/v1/deployments/{args.name}/rollback", json=body)))


def _history(args: argparse.Namespace) -> None:
    d = _call(args, "GET", f"/api/v1/deployments/{args.name}")
    for v in d["history"]:
        live = "*" if v["version"] == d["version"] else " "
        print(f"{live} v{v['version']}  {v['created_at']}  {v['model_path']}  {v['reason']}")


def export_traces(args: argparse.Namespace, out: TextIO) -> int:
    """Every matching trace as one JSON line, oldest first, paging with `after_seq`."""
    params: dict[str, Any] = {"deployment": args.deployment, "limit": 1000, "after_seq": args.after_seq}
    if args.version is not None:
        params["version"] = args.version
    if args.has_feedback is not None:
        params["has_feedback"] = args.has_feedback
    if args.session_id is not None:
        params["session_id"] = args.session_id
    n = 0
    while True:
        page = _call(args, "GET", "/api/v1/traces", params=params)
        for t in page["traces"]:
            out.write(json.dumps(t, ensure_ascii=False) + "\n")
        n += len(page["traces"])
        if len(page["traces"]) < params["limit"]:
            return n
        params["after_seq"] = page["next_seq"]


def _export(args: argparse.Namespace) -> None:
    if args.out in (None, "-"):
        n = export_traces(args, sys.stdout)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            n = export_traces(args, f)
    print(f"exported {n} trace(s)", file=sys.stderr)


def _run(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            fn(args)
        except ApiError as e:
            print(f"treadle: error: {e}", file=sys.stderr)
            return 2
        return 0

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-url", default=None, help=f"server URL (default: $TINKER_BASE_URL or {DEFAULT_URL})"
    )
    p.add_argument("--api-key", default=None, help="API key (default: $TINKER_API_KEY or tml-local)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")


def register(sub: Any) -> None:
    d = sub.add_parser(
        "deploy", help="deployments: named, versioned pointers to a checkpoint served over OpenAI"
    )
    dsub = d.add_subparsers(dest="deploy_command", required=True)
    c = dsub.add_parser("create", help="create a deployment serving MODEL_PATH as version 1")
    c.add_argument("name")
    c.add_argument("model_path", help="tinker://RUN/sampler_weights/NAME or a served base model")
    c.set_defaults(func=_run(_create))
    ls = dsub.add_parser("list", help="your deployments and their live versions")
    ls.set_defaults(func=_run(_list))
    p = dsub.add_parser("promote", help="make MODEL_PATH live as a new version")
    p.add_argument("name")
    p.add_argument("model_path")
    p.add_argument("--reason", default=None)
    p.set_defaults(func=_run(_promote))
    r = dsub.add_parser("rollback", help="make an earlier version's checkpoint live again (as a new version)")
    r.add_argument("name")
    r.add_argument("--version", type=int, default=None, help="default: the version before the live one")
    r.add_argument("--reason", default=None)
    r.set_defaults(func=_run(_rollback))
    h = dsub.add_parser("history", help="every version of a deployment (* = live)")
    h.add_argument("name")
    h.set_defaults(func=_run(_history))
    for q in (c, ls, p, r, h):
        _common(q)

    t = sub.add_parser("traces", help="token-exact traces of what deployments served")
    tsub = t.add_subparsers(dest="traces_command", required=True)
    e = tsub.add_parser(
        "export", help="write a deployment's traces as JSONL (one trace per line, oldest first)"
    )
    e.add_argument("--deployment", required=True)
    e.add_argument("--out", default=None, help="file to write (default: stdout)")
    e.add_argument("--version", type=int, default=None)
    e.add_argument("--has-feedback", choices=["true", "false"], default=None)
    e.add_argument("--session-id", default=None)
    e.add_argument("--after-seq", type=int, default=0, help="only traces with a larger seq")
    e.set_defaults(func=_run(_export))
    _common(e)
