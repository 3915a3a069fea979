"""Plain-HTTP client for the deployment, trace and feedback routes (client side: httpx, no server imports).

Wire shapes are the deployment/trace/feedback contract: Deployment, Trace and Feedback are JSON objects,
kept here as plain dicts so the learner reads exactly what the server sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx

from treadle.errors import TreadleError

Json = dict[str, Any]


class RestError(TreadleError):
    """A deployment/trace route answered with an error; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class DeploymentsClient:
    """`/api/v1/deployments`, `/api/v1/traces` and `/v1/feedback` for one API key."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers={"X-API-Key": api_key}, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DeploymentsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Json:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise RestError(f"{method} {path}: no answer from {self.base_url}: {e}", 0) from None
        if resp.status_code >= 400:
            try:
                detail: Any = resp.json()
            except ValueError:
                detail = resp.text[:500]
            raise RestError(f"{method} {path}: HTTP {resp.status_code}: {detail}", resp.status_code)
        return resp.json()

    # deployments
    def create_deployment(self, name: str, model_path: str) -> Json:
        return self._call("POST", "/api/v1/deployments", json={"name": name, "model_path": model_path})

    def get_deployment(self, name: str) -> Json:
        return self._call("GET", f"/api/v1/deployments/{name}")

    def list_deployments(self) -> list[Json]:
        return list(self._call("GET", "/api/v1/deployments")["deployments"])

    def promote(self, name: str, model_path: str, reason: str) -> Json:
        body = {"model_path": model_path, "reason": reason}
        return self._call("POST", f"/api/v1/deployments/{name}/promote", json=body)

    def rollback(self, name: str, version: int | None, reason: str) -> Json:
        body: Json = {"reason": reason}
        if version is not None:
            body["version"] = version
        return self._call("POST", f"/api/v1/deployments/{name}/rollback", json=body)

    # traces
    def get_trace(self, completion_id: str) -> Json:
        return self._call("GET", f"/api/v1/traces/{completion_id}")

    def list_traces(
        self,
        deployment: str,
        *,
        after_seq: int = 0,
        has_feedback: bool | None = None,
        version: int | None = None,
        limit: int = 500,
    ) -> tuple[list[Json], int]:
        params: dict[str, Any] = {"deployment": deployment, "after_seq": after_seq, "limit": limit}
        if has_feedback is not None:
            params["has_feedback"] = "true" if has_feedback else "false"
        if version is not None:
            params["version"] = version
        page = self._call("GET", "/api/v1/traces", params=params)
        return list(page["traces"]), int(page["next_seq"])

    def iter_traces(
        self, deployment: str, *, after_seq: int = 0, has_feedback: bool | None = None, limit: int = 500
    ) -> Iterator[Json]:
        """Every trace after `after_seq`, page by page, in seq order."""
        while True:
            traces, _ = self.list_traces(
                deployment, after_seq=after_seq, has_feedback=has_feedback, limit=limit
            )
            yield from traces
            if not traces:
                return
            # resume after the last trace seen (not `next_seq`): this can never skip one
            after_seq = max(int(t["seq"]) for t in traces)

    # feedback (the learner itself never rates; tools and tests do)
    def feedback(self, completion_id: str, **fields: Any) -> Json:
        return self._call("POST", "/v1/feedback", json={"completion_id": completion_id, **fields})
