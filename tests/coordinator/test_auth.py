"""Authentication and tenant isolation: tenant A's credentials cannot read, submit or act
for tenant B, and every refusal is a JSON error body."""

import pytest

from consortia.protocol.tensors import encode
from support import SPEC


def raw(coord, method, path, token=None, **kw):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return coord.http.request(method, path, headers=headers, **kw)


def assert_error(resp, status, code):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code and isinstance(body["detail"], str) and body["detail"]


@pytest.mark.parametrize("path", ["/v1/tenants", "/v1/jobs", "/v1/sites", "/v1/sites/me/tasks"])
def test_every_api_call_needs_a_credential(coord, path):
    assert_error(raw(coord, "GET", path), 401, "unauthenticated")
    assert_error(raw(coord, "GET", path, token="cst_admin_forged"), 401, "unauthenticated")
    resp = coord.http.get(path, headers={"Authorization": "Basic abc"})
    assert_error(resp, 401, "unauthenticated")


def test_admin_credential_file_is_private(coord):
    mode = (coord.home / "admin.token").stat().st_mode & 0o777
    assert mode == 0o600


def test_enrollment_token_is_one_time(coord):
    token = coord.tenant("bank-a")
    assert coord.client(None).enroll(token, "s1").tenant == "bank-a"
    resp = raw(coord, "POST", "/v1/enroll", json={"enrollment_token": token, "site_name": "s2"})
    assert_error(resp, 401, "unauthenticated")
    assert "already used" in resp.json()["detail"]


def test_expired_enrollment_token_is_refused(coord):
    from datetime import timedelta

    from consortia.coordinator.auth import hash_token
    from consortia.store.entities import utcnow

    store = coord.http.app.state.store
    tenant = store.create_tenant("bank-x", False, "admin")
    store.add_enrollment_token(
        tenant.id, "bank-x", hash_token("cst_enroll_expiredtoken"), utcnow() - timedelta(seconds=1), "admin"
    )
    resp = raw(coord, "POST", "/v1/enroll", json={"enrollment_token": "cst_enroll_expiredtoken", "site_name": "s"})
    assert_error(resp, 401, "unauthenticated")
    assert "expired" in resp.json()["detail"]


def test_site_of_tenant_a_cannot_touch_tenant_b(coord):
    a, b = coord.site("bank-a"), coord.site("bank-b")
    job = coord.admin.post_json("/v1/jobs", SPEC)
    b_task = b.client.poll(0)[0]
    a_token = a.client._http.headers["Authorization"].split()[1]
    # A cannot answer, refuse or upload for B's task
    assert_error(
        raw(coord, "POST", f"/v1/tasks/{b_task.id}/refuse", a_token, json={"reason": "x", "rule": "y"}),
        403,
        "forbidden",
    )
    assert_error(raw(coord, "POST", f"/v1/tasks/{b_task.id}/result", a_token, json={}), 403, "forbidden")
    assert_error(
        raw(
            coord,
            "POST",
            f"/v1/tasks/{b_task.id}/update",
            a_token,
            content=encode({"w": __import__("numpy").ones(1, "float32")}, {"num_examples": "1"}),
        ),
        403,
        "forbidden",
    )
    # A's polls never return B's tasks
    assert all(t.id != b_task.id for t in a.client.poll(0))
    # sites cannot read tenants, other sites, or jobs
    assert_error(raw(coord, "GET", "/v1/tenants/bank-b", a_token), 403, "forbidden")
    assert_error(raw(coord, "GET", "/v1/sites", a_token), 403, "forbidden")
    assert_error(raw(coord, "GET", f"/v1/jobs/{job['id']}", a_token), 403, "forbidden")
    assert_error(raw(coord, "POST", "/v1/jobs", a_token, json=SPEC), 403, "forbidden")
    # B's task is untouched
    assert coord.http.app.state.store.get_task(b_task.id).state == "delivered"


def test_tenant_operator_is_scoped_to_its_tenant(coord):
    coord.site("bank-a"), coord.site("bank-b")
    op_a = coord.admin.post_json("/v1/credentials", {"name": "ops-a", "role": "operator", "tenant": "bank-a"})["token"]
    assert raw(coord, "GET", "/v1/tenants/bank-a", op_a).status_code == 200
    assert [t["name"] for t in raw(coord, "GET", "/v1/tenants", op_a).json()] == ["bank-a"]
    assert [s["tenant"] for s in raw(coord, "GET", "/v1/sites", op_a).json()] == ["bank-a"]
    assert_error(raw(coord, "GET", "/v1/tenants/bank-b", op_a), 403, "forbidden")
    assert_error(raw(coord, "GET", "/v1/sites?tenant=bank-b", op_a), 403, "forbidden")
    assert_error(raw(coord, "POST", "/v1/tenants/bank-b/enrollment-tokens", op_a), 403, "forbidden")
    assert raw(coord, "POST", "/v1/tenants/bank-a/enrollment-tokens", op_a).status_code == 201
    assert_error(raw(coord, "POST", "/v1/tenants", op_a, json={"name": "evil"}), 403, "forbidden")
    assert_error(raw(coord, "POST", "/v1/jobs", op_a, json=SPEC), 403, "forbidden")
    auditor = coord.admin.post_json("/v1/credentials", {"name": "aud", "role": "auditor"})["token"]
    assert_error(raw(coord, "POST", "/v1/jobs", auditor, json=SPEC), 403, "forbidden")


def test_site_reads_only_models_of_its_own_tasks(coord):
    a, b = coord.site("bank-a"), coord.site("bank-b")
    c = coord.site("bank-c")
    coord.admin.post_json("/v1/jobs", {**SPEC, "tenants": ["bank-a", "bank-b"]})
    for ctx in (a, b):
        for task in ctx.client.poll(0):
            from consortia.site.tasks import dispatch

            dispatch(ctx, task)
    import time

    for _ in range(100):
        tasks = a.client.poll(0)
        if tasks and tasks[0].global_hash:
            break
        time.sleep(0.05)
    digest = tasks[0].global_hash
    assert a.client.blob(digest)
    c_token = c.client._http.headers["Authorization"].split()[1]
    assert_error(raw(coord, "GET", f"/v1/blobs/{digest}", c_token), 404, "not_found")


def test_expired_and_revoked_credentials_are_refused(coord):
    from datetime import timedelta

    from consortia.coordinator.auth import hash_token
    from consortia.store.entities import utcnow

    store = coord.http.app.state.store
    store.add_credential(
        token_hash=hash_token("cst_operator_old"),
        name="old",
        role="operator",
        tenant_id=None,
        site_id=None,
        expires_at=utcnow() - timedelta(days=1),
        actor="admin",
    )
    resp = raw(coord, "GET", "/v1/jobs", "cst_operator_old")
    assert_error(resp, 401, "unauthenticated")
    assert "expired" in resp.json()["detail"]


def test_openapi_is_served(coord):
    spec = coord.http.get("/openapi.json").json()
    assert "/v1/tasks/{task_id}/update" in spec["paths"]
    assert coord.http.get("/healthz").json()["status"] == "ok"
