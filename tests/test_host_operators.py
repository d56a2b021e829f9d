"""Operator authentication at the reference clearing host (issue 9: the admin API open by
default, the read API and the operator page open to anyone, cross-site admin calls).

Every test runs the real host (uvicorn) on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.errors import ConfigurationError
from agent.offline_store import DeviceKey
from clearinghost import cli
from clearinghost.keys import HostKey
from clearinghost.operators import (
    OPERATOR,
    TOKEN_ENV,
    VIEWER,
    Operators,
    add_operator,
    check_exposure,
    read_operators_file,
)
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from tests.test_sync_support import enrol_body

READ_ROUTES = ("/", "/v1/terminals", "/v1/anomalies", "/v1/terminals/T1/records")
CARD = "03105170070100000009"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(name: str, token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()}


class Site:
    """A host with a viewer and an operator from an operators file, served on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.file = root / "operators.txt"
        self.viewer = add_operator(self.file, "wall", VIEWER)
        self.operator = add_operator(self.file, "alice", OPERATOR)
        self.host = ClearingHost(
            SqliteStorage(root / "host.db"),
            HostKey.generate(),
            operators=Operators.load(self.file, environ={}),
        )
        self.server = HostServer(create_app(self.host))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    site = Site(tmp_path)
    with site.server:
        yield site
    site.host.storage.close()


def published(host: ClearingHost) -> tuple[int, object]:
    return host.storage.blacklist_version(), host.storage.latest_params()


def test_no_operators_means_every_operator_route_refuses(tmp_path: Path) -> None:
    host = ClearingHost(
        SqliteStorage(tmp_path / "h.db"), HostKey.generate(), open_registration=True
    )
    with HostServer(create_app(host)) as server, httpx.Client(base_url=server.url) as client:
        listed = client.post("/v1/admin/blacklist", json={"add": [f"{n:016X}" for n in range(50)]})
        assert listed.status_code == 401
        assert listed.json()["error"] == "unauthorised"
        zero = client.post("/v1/admin/params", json={"fare_table": {"flat_fare": 0}})
        assert zero.status_code == 401
        assert published(host) == (0, None)
        for route in READ_ROUTES:
            answer = client.get(route)
            assert answer.status_code == 401, route
            assert "T1" not in answer.text
        # any token is wrong when nobody is configured
        assert client.get("/v1/terminals", headers={"Authorization": "Bearer"}).status_code == 401
        assert client.get("/v1/terminals", headers=bearer("x" * 40)).status_code == 401
        # the terminal-facing routes keep their own rules
        register = client.post(
            "/v1/terminals/T1/register", json=enrol_body("T1", DeviceKey.generate())
        )
        assert register.status_code == 201
        assert client.post("/v1/terminals/T1/heartbeat", json={}).status_code == 200
        assert client.get("/v1/blacklist").status_code == 200
        assert client.get("/v1/params").status_code == 404
        assert client.get("/healthz").status_code == 200
        assert client.get("/openapi.json").status_code == 200
    host.storage.close()


def test_viewer_reads_but_cannot_publish_operator_can(site: Site) -> None:
    with httpx.Client(base_url=site.server.url) as client:
        for headers in (bearer(site.viewer), basic("wall", site.viewer)):
            for route in READ_ROUTES:
                assert client.get(route, headers=headers).status_code == 200, route
            page = client.get("/", headers=headers)
            assert "Clearing host" in page.text
            assert page.headers["x-frame-options"] == "DENY"
            refused = client.post("/v1/admin/blacklist", json={"add": ["01"]}, headers=headers)
            assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
            fares = client.post(
                "/v1/admin/params", json={"fare_table": {"flat_fare": 0}}, headers=headers
            )
            assert fares.status_code == 403
        assert published(site.host) == (0, None)

        done = client.post(
            "/v1/admin/blacklist", json={"add": ["01"]}, headers=bearer(site.operator)
        )
        assert done.status_code == 200 and done.json() == {"version": 1}
        fares = client.post(
            "/v1/admin/params",
            json={"fare_table": {"flat_fare": 250}},
            headers=basic("alice", site.operator),
        )
        assert fares.status_code == 200
        assert site.host.storage.blacklist_snapshot() == (1, [1])
        assert client.get("/v1/terminals", headers=bearer(site.operator)).status_code == 200


def test_wrong_tokens_are_refused(site: Site) -> None:
    wrong = [
        {},
        bearer(site.operator + "x"),
        bearer(site.operator[:-1]),
        bearer(hashlib.sha256(site.operator.encode()).hexdigest()),  # the stored hash itself
        {"Authorization": site.operator},  # no scheme
        {"Authorization": "Bearer"},
        basic("wall", site.operator),  # alice's token under another name
        basic("alice", ""),
        {"Authorization": "Basic !!not-base64!!"},
        {"Authorization": "Digest " + site.operator},
    ]
    with httpx.Client(base_url=site.server.url) as client:
        for headers in wrong:
            answer = client.post("/v1/admin/blacklist", json={"add": ["01"]}, headers=headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"].startswith("Basic")
            assert client.get("/v1/terminals", headers=headers).status_code == 401, headers
            assert client.get("/", headers=headers).status_code == 401, headers
    assert published(site.host) == (0, None)


def test_admin_posts_need_json_and_no_foreign_origin(site: Site) -> None:
    auth = bearer(site.operator)
    body = '{"add": ["0000000000000001"]}'
    with httpx.Client(base_url=site.server.url) as client:
        for media in (
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ):
            for path in ("/v1/admin/blacklist", "/v1/admin/params"):
                answer = client.post(path, content=body, headers={**auth, "Content-Type": media})
                assert answer.status_code == 415, (path, media)
        no_type = client.post("/v1/admin/blacklist", content=body, headers=auth)
        assert no_type.status_code == 415
        for origin in ("https://evil.example", "null", site.server.url + ".evil.example"):
            foreign = {**auth, "Origin": origin}
            answer = client.post("/v1/admin/blacklist", json={"add": ["01"]}, headers=foreign)
            assert answer.status_code == 403 and answer.json()["error"] == "foreign_origin"
            assert client.get("/v1/terminals", headers=foreign).status_code == 403
        assert published(site.host) == (0, None)
        own = {**auth, "Origin": site.server.url}
        answer = client.post(
            "/v1/admin/blacklist",
            content=body,
            headers={**own, "Content-Type": "application/json; charset=utf-8"},
        )
        assert answer.status_code == 200 and answer.json() == {"version": 1}


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "ops.txt"
    token = add_operator(path, "alice", OPERATOR)
    other = add_operator(path, "bob", VIEWER)
    assert len(token) >= 40 and token != other
    text = path.read_text()
    assert token not in text and other not in text
    assert f"alice:operator:sha256:{hashlib.sha256(token.encode()).hexdigest()}" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(o.name, o.role) for o in read_operators_file(path)] == [
        ("alice", OPERATOR),
        ("bob", VIEWER),
    ]
    with pytest.raises(ConfigurationError, match="already exists"):
        add_operator(path, "alice", VIEWER)
    with pytest.raises(ConfigurationError, match="role"):
        add_operator(path, "carol", "root")
    operators = Operators.load(path, environ={})
    assert operators.authenticate(token).name == "alice"  # type: ignore[union-attr]
    assert operators.authenticate(hashlib.sha256(token.encode()).hexdigest()) is None

    os.chmod(path, 0o666)
    with pytest.raises(ConfigurationError, match="writable by anyone"):
        read_operators_file(path)
    os.chmod(path, 0o600)
    path.write_text("alice:operator:my-plain-token\n")
    with pytest.raises(ConfigurationError, match="line 1"):
        read_operators_file(path)


def test_single_operator_from_the_environment() -> None:
    token = "an-operator-token-from-the-environment"
    operators = Operators.load(None, environ={TOKEN_ENV: token})
    who = operators.authenticate(token)
    assert who is not None and who.role == OPERATOR and who.may(VIEWER)
    assert Operators.load(None, environ={}).authenticate(token) is None
    with pytest.raises(ConfigurationError, match="too short"):
        Operators.load(None, environ={TOKEN_ENV: "short"})


def test_exposure_check() -> None:
    nobody, someone = Operators(), Operators.with_token("a", OPERATOR, "t" * 32)
    for address in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(address, tls=False, operators=nobody)
    for address in ("0.0.0.0", "::", "192.0.2.7", "host.example"):
        for tls, operators in ((False, nobody), (True, nobody), (False, someone)):
            with pytest.raises(ConfigurationError, match="refusing to listen"):
                check_exposure(address, tls=tls, operators=operators)
        check_exposure(address, tls=True, operators=someone)


def _cardhost(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "clearinghost.cli", "--log-format", "json", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )


def test_host_refuses_to_listen_beyond_loopback_without_tls_and_operators(tmp_path: Path) -> None:
    common = ("host", "--db", str(tmp_path / "h.db"), "--key", str(tmp_path / "h.key"))
    plain = _cardhost(*common, "--listen", "0.0.0.0:0")
    assert plain.returncode == 2
    assert "refusing to listen on 0.0.0.0" in plain.stderr and "TLS" in plain.stderr
    with_operator = _cardhost(
        *common, "--listen", "0.0.0.0:0", env={TOKEN_ENV: "a-long-enough-operator-token"}
    )
    assert with_operator.returncode == 2 and "TLS" in with_operator.stderr
    assert not (tmp_path / "h.db").exists()  # refused before opening anything


def test_operator_command_and_blacklist_command_use_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "ops.txt"
    assert cli.main(["operator", "add", "alice", "--role", "operator", "--file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token and token not in path.read_text()
    assert cli.main(["operator", "add", "wall", "--file", str(path)]) == 0  # viewer by default
    viewer = capsys.readouterr().out.strip()
    assert cli.main(["operator", "list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["alice", "operator", "wall", "viewer"]

    host = ClearingHost(
        SqliteStorage(tmp_path / "h.db"),
        HostKey.generate(),
        operators=Operators.load(path, environ={}),
    )
    with HostServer(create_app(host)) as server:
        url = server.url
        assert cli.main(["blacklist", "--host", url, "add", CARD]) == 2  # no token at all
        (tmp_path / "viewer.token").write_text(viewer + "\n")
        denied = ["blacklist", "--host", url, "--token-file", str(tmp_path / "viewer.token")]
        assert cli.main([*denied, "add", CARD]) == 2
        assert host.storage.blacklist_version() == 0
        (tmp_path / "op.token").write_text(token + "\n")
        with_file = ["blacklist", "--host", url, "--token-file", str(tmp_path / "op.token")]
        assert cli.main([*with_file, "add", CARD]) == 0
        assert host.storage.blacklist_version() == 1
        monkeypatch.setenv(TOKEN_ENV, token)
        assert cli.main(["blacklist", "--host", url, "remove", CARD]) == 0
        assert host.storage.blacklist_snapshot() == (2, [])
    assert cli.main(["operator", "remove", "wall", "--file", str(path)]) == 0
    assert [o.name for o in read_operators_file(path)] == ["alice"]
    host.storage.close()
