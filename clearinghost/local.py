"""The demo's helper: a local clearing host and the sync daemon beside the agent, in-process.

::

    sync = start_local_sync(data_dir, profile=demo_profile)   # host on 127.0.0.1, daemon jobs
    sync.blacklist_card(card_id)     # published through the admin API; the daemon pulls it
    ...                              # agent: Blacklist.open(data_dir / "blacklist.bin")
    sync.stop()

The host keeps its database and signing key (generated here: a demo key, never a real one)
in ``host_dir`` (default ``data_dir / "clearing-host"``). The helper makes itself an operator
with a fresh random token (``operator_token``, kept in memory only) and publishes with it.
Enrolment is closed as on a real host: the helper, as the operator, adds the terminal's entry
through the admin API and hands the one-time code to the daemon, which enrols with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from agent.blacklist import asn_of
from agent.profile import Profile
from agent.sam.keys import KeySet
from agent.wiring import DataDir
from clearinghost.clearing import DEMO_FACTOR2, TacVerifier
from clearinghost.keys import HostKey
from clearinghost.loads import LoadAuthority
from clearinghost.operators import OPERATOR, Operators, new_token
from clearinghost.server import ClearingHost, HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync.daemon import SyncDaemon, SyncSettings, open_daemon


@dataclass
class LocalSync:
    host: ClearingHost
    server: HostServer
    daemon: SyncDaemon
    operator_token: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    def blacklist_card(self, card_id: str) -> int:
        """Publish the card at the host (admin API); returns the new blacklist version."""
        return self._publish({"add": [f"{asn_of(card_id):016X}"], "remove": []})

    def unblacklist_card(self, card_id: str) -> int:
        return self._publish({"add": [], "remove": [f"{asn_of(card_id):016X}"]})

    def _publish(self, body: dict[str, list[str]]) -> int:
        answer = _admin_post(self.url, self.operator_token, "/v1/admin/blacklist", body)
        answer.raise_for_status()
        return int(answer.json()["version"])

    def records_at_host(self) -> int:
        return self.host.storage.count_records(self.daemon.store.terminal_id)

    def wait_for_blacklist(self, version: int, timeout_s: float = 10.0) -> bool:
        """Wait until the daemon has applied ``version`` (demo pacing, tests)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.daemon.blacklist.version >= version:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.daemon.stop()
        self.daemon.close()
        self.server.stop()
        self.host.storage.close()


def start_local_sync(
    data_dir: Path,
    *,
    host_dir: Path | None = None,
    profile: Profile | None = None,
    upload_interval_s: float = 2.0,
    blacklist_interval_s: float = 2.0,
    params_interval_s: float = 30.0,
    heartbeat_interval_s: float = 5.0,
    loads: LoadAuthority | None = None,
    **settings: Any,
) -> LocalSync:
    """Start the host (SQLite, 127.0.0.1, a free port) and the daemon for ``data_dir``.

    With a test ``profile``, the host recomputes TACs from its test keys (demo cards' factors).
    With ``loads``, the host authorises online loads and keeps pending loads (the caller closes
    it after :meth:`LocalSync.stop`).
    """
    host_dir = host_dir or data_dir / "clearing-host"
    host_dir.mkdir(parents=True, exist_ok=True)
    key = HostKey.load_or_create(host_dir / "demo-host.key")
    tac = None
    if profile is not None and profile.test_keys:
        tac = TacVerifier(
            KeySet.from_mapping(profile.test_keys),
            DEMO_FACTOR2,
            apdu_order_card_first=profile.factor_order_card_first,
        )
    token = new_token()
    host = ClearingHost(
        SqliteStorage(host_dir / "host.db"),
        key,
        tac=tac,
        operators=Operators.with_token("local-sync", OPERATOR, token),
        loads=loads,
    )
    server = HostServer(create_app(host), log_level="critical").start()
    try:
        code = _enrolment_code(server.url, token, DataDir(data_dir).terminal_id())
        options: dict[str, Any] = {
            "upload_interval_s": upload_interval_s,
            "upload_threshold": 50,
            "check_interval_s": 0.5,
            "blacklist_interval_s": blacklist_interval_s,
            "params_interval_s": params_interval_s,
            "heartbeat_interval_s": heartbeat_interval_s,
            "compact_after_s": None,
            "timeout_s": 5.0,
            "enrolment_code": code,
        }
        options.update(settings)
        daemon = open_daemon(data_dir, SyncSettings(server.url, key.public_key_bytes, **options))
        daemon.start()
    except BaseException:
        server.stop()
        host.storage.close()
        raise
    return LocalSync(host, server, daemon, token)


def _admin_post(url: str, token: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def _enrolment_code(url: str, token: str, terminal_id: str) -> str:
    """What an operator does for a new terminal (``cardhost terminal add``): its entry and a
    one-time code. A host directory kept from an earlier run knows the terminal already: a
    fresh code is authorised then (the same device key is simply recognised)."""
    body = {"terminal_id": terminal_id, "kind": "bus", "site": "demo"}
    answer = _admin_post(url, token, "/v1/admin/terminals", body)
    if answer.status_code == 409:
        answer = _admin_post(url, token, f"/v1/admin/terminals/{terminal_id}/rotate-key", {})
    answer.raise_for_status()
    return str(answer.json()["enrolment_code"])
