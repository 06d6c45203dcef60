"""A hub refuses an upstream secure round it cannot relay as a secure round of its own."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import httpx

from consortia.coordinator.services.hub import HubAgent
from consortia.protocol.schemas import JobSpec, TaskPublic
from support import SPEC


def _upstream_task(spec: dict) -> TaskPublic:
    return TaskPublic(
        id=7,
        job_id=3,
        kind="train",
        round=1,
        attempt=0,
        deadline_at=datetime.now(UTC) + timedelta(seconds=60),
        global_hash="0" * 64,
        payload={"spec": JobSpec.model_validate(spec).model_dump(mode="json")},
    )


def test_a_hub_with_two_sites_refuses_a_secure_round_and_says_why(coord, tmp_path):
    coord.site("east-a"), coord.site("east-b")  # the hub's own sites: too few to hide one update
    sent: list[httpx.Request] = []
    upper = httpx.MockTransport(lambda req: sent.append(req) or httpx.Response(200, json={}))  # the upper coordinator
    hub = HubAgent(coord.http.app.state.rounds, "http://upper", None, "east", tmp_path)
    secure = {**SPEC, "name": "secure", "min_sites": 3, "secure_aggregation": {}}

    async def handle() -> None:
        async with httpx.AsyncClient(base_url="http://upper", transport=upper) as client:
            await hub.handle(client, _upstream_task(secure))

    asyncio.run(handle())
    (req,) = sent
    assert req.url.path == "/v1/tasks/7/refuse"
    body = json.loads(req.content)
    assert body["rule"] == "hub.secure_aggregation"
    assert "this hub has 2 active site(s)" in body["reason"] and "at least 3" in body["reason"]
    assert coord.http.app.state.store.list_jobs() == []  # nothing relayed, no round opened
