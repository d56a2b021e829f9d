"""Parameter sets are checked at publication (issue 9: ``{"effective_from": "never"}`` was
stored as published and every ``GET /v1/params`` answered 500 from then on).

The host refuses (400 naming the field) any set the sync daemon or the agent would refuse or
silently ignore, and a bad set already stored is skipped, never a 500. Real host on 127.0.0.1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.params import verify_envelope
from clearinghost import server as server_module
from clearinghost.keys import HostKey, sign_params
from clearinghost.operators import OPERATOR, Operators
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync.params import verify_params

TOKEN = "params-operator-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[ClearingHost, httpx.Client]]:
    host = ClearingHost(
        SqliteStorage(tmp_path / "host.db"),
        HostKey.generate(),
        operators=Operators.with_token("alice", OPERATOR, TOKEN),
    )
    with (
        HostServer(create_app(host)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield host, client
    host.storage.close()


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"effective_from": "never"}, "effective_from"),
        ({"effective_from": -5}, "effective_from"),
        ({"effective_from": True}, "effective_from"),
        ({"effective_from": 1.5}, "effective_from"),
        ({"effective_from": None}, "effective_from"),
        ({"fare_table": [200]}, "fare_table"),
        ({"fare_table": "flat"}, "fare_table"),
        ({"fare_table": {"flat_fare": "2.00"}}, "fare_table.flat_fare"),
        ({"fare_table": {"flat_fare": -1}}, "fare_table.flat_fare"),
        ({"fare_table": {"flat_fare": 2**40}}, "fare_table.flat_fare"),
        ({"fare_table": {"flat_fare": 2.5}}, "fare_table.flat_fare"),
        ({"fare_table": {"flat_fare": False}}, "fare_table.flat_fare"),
        ({"issuer_allow_list": "3105"}, "issuer_allow_list"),
        ({"issuer_allow_list": [3105]}, "issuer_allow_list"),
        ({"issuer_allow_list": ["310"]}, "issuer_allow_list[0]"),
        ({"issuer_allow_list": ["3105", "XY"]}, "issuer_allow_list[1]"),
        ({"issuer_allow_list": [""]}, "issuer_allow_list[0]"),
    ],
)
def test_publication_refuses_what_terminals_would_refuse(
    host: tuple[ClearingHost, httpx.Client], payload: dict[str, object], field: str
) -> None:
    clearing, client = host
    answer = client.post("/v1/admin/params", json=payload, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_params"
    assert field in answer.json()["detail"]
    assert clearing.storage.latest_params() is None
    assert client.get("/v1/params").status_code == 404


def test_an_infinite_number_is_refused(host: tuple[ClearingHost, httpx.Client]) -> None:
    clearing, client = host
    body = b'{"fare_table": {"flat_fare": 200, "cap": 1e400}}'  # JSON that parses to inf
    answer = client.post(
        "/v1/admin/params", content=body, headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    assert clearing.storage.latest_params() is None


@pytest.mark.parametrize(
    "stored",
    [{"effective_from": "never"}, {"fare_table": {"cap": math.inf}}, {"fare_table": 3}],
)
def test_a_bad_stored_set_is_skipped_not_a_500(
    host: tuple[ClearingHost, httpx.Client],
    stored: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clearing, client = host
    signed: list[int] = []

    def counted(payload: dict[str, Any], key: HostKey) -> bytes:
        signed.append(payload["version"])
        return sign_params(payload, key)

    monkeypatch.setattr(server_module, "sign_params", counted)
    # as an older host (which checked nothing) stored it
    clearing.storage.publish_params(stored)
    assert client.get("/v1/params").status_code == 404  # nothing valid to serve
    assert client.post(
        "/v1/admin/params", json={"fare_table": {"flat_fare": 200}}, headers=ADMIN
    ).is_success
    clearing.storage.publish_params(stored)  # a bad one above a good one
    served = client.get("/v1/params", params={"since": 0})
    assert served.status_code == 200, served.text
    payload = json.loads(served.content)["payload"]
    assert (payload["version"], payload["fare_table"]) == (2, {"flat_fare": 200})
    # what the daemon and the agent check of it
    assert verify_params(served.content, clearing.key.public_key_bytes).version == 2
    assert verify_envelope(served.content, clearing.key.public_key_bytes) == payload
    # within the reissue window the valid set's answer is served again, not signed anew
    assert client.get("/v1/params", params={"since": 2}).content == served.content
    assert signed == [2]


GOOD_POLICY = {
    "mode": "section",
    "max_fare": 400,
    "bands": [{"from": 1, "to": 3, "price": 200}, {"from": 4, "to": 9, "price": 400}],
    "lines": {"8": {"stops": [{"id": i, "section": i} for i in range(1, 10)]}},
}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"bands": [{"from": 1, "to": 3, "price": 200}, {"from": 5, "to": 9, "price": 400}]},
            "fare_policy.bands[1] leaves a gap",
        ),
        (
            {"bands": [{"from": 1, "to": 3, "price": 200}, {"from": 3, "to": 9, "price": 400}]},
            "fare_policy.bands[1] overlaps",
        ),
        ({"bands": [{"from": 1, "to": 9, "price": -200}]}, "fare_policy.bands[0].price"),
        ({"bands": [{"from": 1, "to": 3, "price": 200}]}, "fare_policy.lines.8"),
    ],
)
def test_publication_refuses_a_bad_fare_policy(
    host: tuple[ClearingHost, httpx.Client], changes: dict[str, object], field: str
) -> None:
    clearing, client = host
    body = {"fare_policy": {**GOOD_POLICY, **changes}}
    answer = client.post("/v1/admin/params", json=body, headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["detail"]
    assert clearing.storage.latest_params() is None


def test_fare_policy_effective_dates_at_publication(
    host: tuple[ClearingHost, httpx.Client],
) -> None:
    clearing, client = host
    now = int(time.time())
    past = {"fare_policy": GOOD_POLICY, "effective_from": now - 2 * 86_400}
    answer = client.post("/v1/admin/params", json=past, headers=ADMIN)
    assert answer.status_code == 400 and "in the past" in answer.json()["detail"]
    far = {"fare_policy": GOOD_POLICY, "effective_from": now + 3 * 365 * 86_400}
    answer = client.post("/v1/admin/params", json=far, headers=ADMIN)
    assert answer.status_code == 400 and "more than 400 days" in answer.json()["detail"]
    ahead = {"fare_policy": GOOD_POLICY, "effective_from": now + 7 * 86_400}
    assert client.post("/v1/admin/params", json=ahead, headers=ADMIN).status_code == 200
    assert clearing.storage.latest_params() is not None
