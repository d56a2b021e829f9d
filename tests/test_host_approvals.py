"""A mass blacklist change waits for a second operator (issue 9: "an unauthenticated client
blacklisted 200,000 consecutive card serials in 1.4 s"; authentication came first, this is the
four-eyes part).

A change of more entries than the threshold is held (202 and its id); another operator approves
(then it is applied as one version) or rejects it; a viewer cannot decide, nor can the operator
who asked. Real host (uvicorn) on 127.0.0.1, operators from a real operators file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from clearinghost import cli
from clearinghost.keys import HostKey
from clearinghost.operators import OPERATOR, TOKEN_ENV, VIEWER, Operators, add_operator
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage

THRESHOLD = 50


class Site:
    def __init__(self, root: Path) -> None:
        self.file = root / "operators.txt"
        self.alice = add_operator(self.file, "alice", OPERATOR)
        self.bob = add_operator(self.file, "bob", OPERATOR)
        self.wall = add_operator(self.file, "wall", VIEWER)
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            HostKey.generate(),
            operators=Operators.load(self.file, environ={}),
            approval_threshold=THRESHOLD,
        )
        self.server = HostServer(create_app(self.host))
        self.client: httpx.Client

    def post(self, path: str, token: str, body: object = None) -> httpx.Response:
        return self.client.post(
            path, json={} if body is None else body, headers={"Authorization": f"Bearer {token}"}
        )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server, httpx.Client(base_url=site.server.url, timeout=60) as client:
        site.client = client
        yield site
    site.host.storage.close()


def serials(count: int, start: int = 0x0310517007000000) -> list[str]:
    return [f"{start + n:016X}" for n in range(count)]


def pending(site: Site, change: int, action: str = "approve") -> str:
    return f"/v1/admin/blacklist/pending/{change}/{action}"


def test_a_mass_change_is_held_until_another_operator_approves(site: Site) -> None:
    mass = serials(THRESHOLD + 1)
    held = site.post("/v1/admin/blacklist", site.alice, {"add": mass})
    assert held.status_code == 202, held.text
    change = held.json()["pending_id"]
    assert held.json()["state"] == "pending" and held.json()["entries"] == THRESHOLD + 1
    assert site.host.storage.blacklist_snapshot() == (0, [])  # nothing applied yet
    listed = site.client.get(
        "/v1/admin/blacklist/pending", headers={"Authorization": f"Bearer {site.wall}"}
    )
    assert [(c["id"], c["requested_by"]) for c in listed.json()["pending"]] == [(change, "alice")]

    own = site.post(pending(site, change), site.alice)
    assert own.status_code == 403 and own.json()["error"] == "own_change"
    viewer = site.post(pending(site, change), site.wall)
    assert viewer.status_code == 403 and viewer.json()["error"] == "forbidden"
    nobody = site.client.post(pending(site, change), json={})
    assert nobody.status_code == 401
    assert site.host.storage.blacklist_version() == 0

    approved = site.post(pending(site, change), site.bob)
    assert approved.status_code == 200, approved.text
    assert approved.json() == {
        "pending_id": change,
        "state": "approved",
        "decided_by": "bob",
        "version": 1,
    }
    assert site.host.storage.blacklist_snapshot() == (1, [int(a, 16) for a in mass])
    again = site.post(pending(site, change), site.bob)
    assert again.status_code == 409 and again.json()["error"] == "already_decided"
    assert site.host.storage.blacklist_version() == 1


def test_a_rejected_change_is_never_applied(site: Site) -> None:
    held = site.post("/v1/admin/blacklist", site.bob, {"remove": serials(THRESHOLD + 5)})
    change = held.json()["pending_id"]
    own = site.post(pending(site, change, "reject"), site.bob)
    assert own.status_code == 403
    rejected = site.post(pending(site, change, "reject"), site.alice)
    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    late = site.post(pending(site, change), site.alice)
    assert late.status_code == 409
    assert site.host.storage.blacklist_version() == 0
    assert site.host.storage.pending_changes() == []
    (decided,) = site.host.storage.pending_changes(None)
    assert (decided["state"], decided["decided_by"]) == ("rejected", "alice")


def test_small_changes_apply_at_once_and_adds_and_removes_count_together(site: Site) -> None:
    small = site.post("/v1/admin/blacklist", site.alice, {"add": serials(THRESHOLD)})
    assert small.status_code == 200 and small.json() == {"version": 1}
    both = {"add": serials(30, 1 << 40), "remove": serials(30)}
    assert site.post("/v1/admin/blacklist", site.alice, both).status_code == 202


@pytest.mark.parametrize("change", ["999", "abc", "-1", "1" * 30])
def test_unknown_or_malformed_ids_are_4xx(site: Site, change: str) -> None:
    answer = site.post(pending(site, change), site.bob)  # type: ignore[arg-type]
    assert answer.status_code in (400, 404), answer.text
    assert answer.json()["error"] in ("bad_request", "unknown_change")


def test_cardhost_blacklist_shows_the_pending_id_and_approve_applies_it(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cards = [f"0310517007{n:010d}" for n in range(THRESHOLD + 2)]
    alice_file = tmp_path / "alice.token"
    alice_file.write_text(site.alice + "\n")
    url = site.server.url
    assert (
        cli.main(["blacklist", "--host", url, "--token-file", str(alice_file), "add", *cards]) == 0
    )
    out, err = capsys.readouterr()
    change = site.host.storage.pending_changes()[0]["id"]
    assert f'"pending_id":{change}' in out.replace(" ", "")
    assert f"cardhost approve {change}" in err
    assert site.host.storage.blacklist_version() == 0
    assert cli.main(["approve", str(change), "--host", url, "--token-file", str(alice_file)]) == 2
    monkeypatch.setenv(TOKEN_ENV, site.bob)
    assert cli.main(["approve", str(change), "--host", url]) == 0
    assert '"approved"' in capsys.readouterr().out
    assert len(site.host.storage.blacklist_snapshot()[1]) == THRESHOLD + 2


def test_cardhost_host_takes_the_threshold() -> None:
    args = cli._parser().parse_args(["host", "--key", "k", "--approval-threshold", "10"])
    assert args.approval_threshold == 10
