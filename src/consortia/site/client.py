"""One HTTP client for everything that talks to the coordinator (site agent and CLI).

The transport is injectable (``httpx.MockTransport`` or any ``httpx.BaseTransport``) so
tests can exercise the agent without a network. Coordinator errors come back as the
JSON body ``{"error": code, "detail": message}`` and are raised as the matching
:mod:`consortia.errors` class; connection failures and 5xx become
:class:`CoordinatorUnavailable` (the agent retries those with backoff).
"""

from __future__ import annotations

from typing import Any

import httpx

from consortia.errors import (
    AuthError,
    ConflictError,
    ConsortiaError,
    CoordinatorUnavailable,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ValidationError,
)
from consortia.protocol.schemas import (
    EnrollResponse,
    RefusalRequest,
    TaskPublic,
    TaskResultPublic,
)
from consortia.store.blobs import sha256_hex

__all__ = ["CoordinatorClient"]

_BY_STATUS: dict[int, type[ConsortiaError]] = {
    401: AuthError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
}


class CoordinatorClient:
    """Synchronous client for the coordinator's ``/v1`` API."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        if http is not None:  # e.g. FastAPI's TestClient in tests
            http.headers.update(headers)
            self._http = http
        else:
            self._http = httpx.Client(base_url=self.base_url, headers=headers, transport=transport, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise CoordinatorUnavailable(f"coordinator at {self.base_url} timed out ({exc}).") from exc
        except httpx.TransportError as exc:
            raise CoordinatorUnavailable(
                f"cannot reach the coordinator at {self.base_url}: {exc}. Is it running?"
            ) from exc
        if resp.status_code >= 500:
            raise CoordinatorUnavailable(f"coordinator error {resp.status_code}: {_detail(resp)}")
        if resp.status_code >= 400:
            cls = _BY_STATUS.get(resp.status_code, ConsortiaError)
            raise cls(_detail(resp))
        return resp

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json=body).json()

    # ------------------------------------------------------------------ site calls

    def enroll(self, enrollment_token: str, site_name: str) -> EnrollResponse:
        data = self.post_json("/v1/enroll", {"enrollment_token": enrollment_token, "site_name": site_name})
        return EnrollResponse.model_validate(data)

    def poll(self, wait: float = 20.0) -> list[TaskPublic]:
        data = self.request("GET", "/v1/sites/me/tasks", params={"wait": wait}, timeout=wait + 30.0).json()
        return [TaskPublic.model_validate(t) for t in data["tasks"]]

    def blob(self, digest: str) -> bytes:
        data = self.request("GET", f"/v1/blobs/{digest}").content
        if sha256_hex(data) != digest:
            raise CoordinatorUnavailable(f"blob {digest} arrived corrupted (hash mismatch); will retry.")
        return data

    def submit_update(self, task_id: int, body: bytes, wait: float = 0.0) -> dict[str, Any]:
        resp = self.request(
            "POST",
            f"/v1/tasks/{task_id}/update",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
            params={"wait": wait} if wait else None,
            timeout=60.0 + wait,
        )
        return resp.json()  # type: ignore[no-any-return]

    def submit_result(self, task_id: int, result: TaskResultPublic) -> dict[str, Any]:
        return self.post_json(f"/v1/tasks/{task_id}/result", result.model_dump(mode="json"))  # type: ignore[no-any-return]

    def refuse(self, task_id: int, reason: str, rule: str) -> dict[str, Any]:
        body = RefusalRequest(reason=reason[:2000], rule=rule).model_dump()
        return self.post_json(f"/v1/tasks/{task_id}/refuse", body)  # type: ignore[no-any-return]


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return str(body.get("detail") or body)
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
