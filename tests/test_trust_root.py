"""The root of trust (issue 9: signed lists with TUF's guarantees).

* root statements: a rotation is accepted only with the root in force's threshold and the new
  root's own; rollback, a conflicting statement of the same version and a skipped version are
  refused; a threshold of 2 needs two root keys;
* against the real host on 127.0.0.1: the host's signing key is rotated by a root statement;
  the daemon, pinned to the old key, accepts the new key, applies the lists and answers it
  signs, and refuses the revoked key afterwards; the agent verifies the parameter set against
  the chain in ``root.json``;
* a parameter set of the same version with other content is refused.

Keys here are generated per test: TEST KEYS ONLY.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.errors import ConfigurationError
from agent.params import ActiveParams
from agent.trust import (
    ROOT_FILE,
    RootFile,
    RootRejected,
    TrustRoot,
    load_signing_keys,
    pinned_root,
    root_payload,
    verify_root_statement,
)
from clearinghost import cli as cardhost
from clearinghost.keys import (
    HostKey,
    add_root_signature,
    check_root_statements,
    sign_params,
    sign_root_statement,
)
from clearinghost.server import HostServer, create_app
from clearinghost.storage import SqliteStorage
from sync.daemon import CHECKS_FILE
from sync.errors import ListRejected
from sync.params import ParamsFile
from tests.test_sync_support import Terminal, daemon_for, fast_settings, make_host

NOW = 1_800_000_000


def statement(
    version: int, roots: list[HostKey], signers: list[HostKey], signing: list[HostKey], t: int = 1
) -> bytes:
    payload = root_payload(
        version=version,
        issued_at=NOW + version,
        root_keys=[k.public_key_bytes for k in roots],
        root_threshold=t,
        signing_keys=[k.public_key_bytes for k in signing],
    )
    return sign_root_statement(payload, signers)


def test_rotation_needs_the_old_root_and_the_new_one() -> None:
    old, root, online = HostKey.generate(), HostKey.generate(), HostKey.generate()
    pinned = pinned_root([old.public_key_bytes])
    assert pinned.signing_keys == (old.public_key_bytes,)  # the smooth path: one pinned key
    with pytest.raises(RootRejected, match="root in force"):  # the new root alone
        verify_root_statement(statement(1, [root], [root], [online]), pinned)
    with pytest.raises(RootRejected, match="its own root keys"):  # the old root alone
        verify_root_statement(statement(1, [root], [old], [online]), pinned)
    with pytest.raises(RootRejected, match="skips"):
        verify_root_statement(statement(2, [root], [old, root], [online]), pinned)
    one = statement(1, [root], [old, root], [online])
    first = verify_root_statement(one, pinned)
    assert first.version == 1 and first.signing_keys == (online.public_key_bytes,)
    assert verify_root_statement(one, first) is first  # the statement in force again
    with pytest.raises(RootRejected, match="other content"):
        verify_root_statement(statement(1, [root], [old, root], [old]), first)
    # a revocation: statement 2 drops the online key; the old pinned key can no longer sign
    two = verify_root_statement(statement(2, [root], [root], [root]), first)
    with pytest.raises(RootRejected, match="rollback"):
        verify_root_statement(one, two)
    with pytest.raises(RootRejected, match="root in force"):
        verify_root_statement(statement(3, [old], [old], [old]), two)


def test_a_threshold_of_two_needs_two_root_keys() -> None:
    a, b, c, online = (HostKey.generate() for _ in range(4))
    pinned = pinned_root([a.public_key_bytes, b.public_key_bytes, c.public_key_bytes], 2)
    with pytest.raises(RootRejected, match="1 valid signature"):
        verify_root_statement(statement(1, [a, b, c], [a], [online], t=2), pinned)
    half = statement(1, [a, b, c], [a], [online], t=2)
    twice = add_root_signature(add_root_signature(half, a), a)  # the same key counts once
    with pytest.raises(RootRejected, match="1 valid signature"):
        verify_root_statement(twice, pinned)
    signed = add_root_signature(half, c)
    assert verify_root_statement(signed, pinned).root_threshold == 2
    with pytest.raises(ConfigurationError, match="threshold 3"):
        pinned_root([a.public_key_bytes, b.public_key_bytes], 3)


def test_root_file_keeps_the_chain_and_the_agent_verifies_it(tmp_path: Path) -> None:
    old, root, online = HostKey.generate(), HostKey.generate(), HostKey.generate()
    path = tmp_path / ROOT_FILE
    pinned = pinned_root([old.public_key_bytes])
    kept = RootFile(path, pinned)
    kept.save()
    assert kept.update(statement(1, [root], [old, root], [online]))
    assert load_signing_keys(path) == (online.public_key_bytes,)
    assert RootFile.open(path, pinned).current.version == 1
    # a root.json whose statement was altered on disk does not verify
    document = json.loads(path.read_text())
    document["statements"][0]["payload"]["signing_keys"] = [old.public_key_bytes.hex()]
    path.write_text(json.dumps(document))
    with pytest.raises(RootRejected):
        load_signing_keys(path)


def test_params_of_the_same_version_with_other_content_are_refused(tmp_path: Path) -> None:
    key = HostKey.generate()
    params = ParamsFile(tmp_path / "params.json", key.public_key_bytes)
    base = {"version": 4, "issued_at": NOW, "expires_at": NOW + 3600, "effective_from": NOW}
    params.apply(sign_params(dict(base, fare_table={"flat_fare": 200}), key), now=NOW)
    later = dict(base, issued_at=NOW + 10, expires_at=NOW + 7200)
    with pytest.raises(ListRejected, match="other content"):
        params.apply(sign_params(dict(later, fare_table={"flat_fare": 900}), key), now=NOW + 10)
    assert params.current is not None and params.current.fare_table == {"flat_fare": 200}
    renewed = params.apply(sign_params(dict(later, fare_table={"flat_fare": 200}), key), now=NOW)
    assert renewed.expires_at == NOW + 7200 and params.checked_at == NOW


def test_a_rotated_host_key_is_accepted_only_through_the_root(tmp_path: Path) -> None:
    """The terminal is pinned to the host's first key (threshold 1). The host moves to a new
    online key under an offline root; the daemon learns it from the root statement, applies
    the lists and upload answers it signs, and the agent verifies params.json against it."""
    first_key, root, online = HostKey.generate(), HostKey.generate(), HostKey.generate()
    rotation = statement(1, [root], [first_key, root], [online])
    terminal = Terminal.provision(tmp_path, "BUS-ROOT")
    host = make_host(SqliteStorage(tmp_path / "host.db"), online, root_statements=(rotation,))
    host.storage.publish_blacklist(add=[0x42], remove=[])
    now = int(time.time())
    host.storage.publish_params(
        {"issued_at": now, "expires_at": now + 3600, "fare_table": {"flat_fare": 150}}
    )
    terminal.tap()
    with HostServer(create_app(host)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, first_key))
        try:
            # the first answer is signed by the new key: the daemon learns the rotation
            assert daemon.upload_pending().ack_seq == 1
            assert daemon.root is not None and daemon.root.current.version == 1
            daemon.pull_blacklist()
            assert daemon.blacklist.contains_asn(0x42)
            assert daemon.pull_params() is not None
        finally:
            daemon.close()
    checked = json.loads((terminal.data_dir / CHECKS_FILE).read_text())
    assert set(checked) == {"blacklist", "params"}  # the newest verified pulls are kept
    agent_params = ActiveParams(terminal.data_dir / "params.json")
    in_force = agent_params.current()
    assert in_force is not None and in_force.flat_fare == 150

    # Without the root statement the same host (the new key) is refused: nothing applied.
    other = Terminal.provision(tmp_path, "BUS-NOROOT")
    bare = make_host(SqliteStorage(tmp_path / "host2.db"), online)
    bare.storage.publish_blacklist(add=[0x42], remove=[])
    with HostServer(create_app(bare)) as server:
        daemon = daemon_for(other, fast_settings(server.url, first_key))
        try:
            with pytest.raises(ListRejected, match="not a signing key in force"):
                daemon.pull_blacklist()
            assert not daemon.blacklist.contains_asn(0x42)
        finally:
            daemon.close()


def test_the_revoked_key_is_refused_after_a_rotation(tmp_path: Path) -> None:
    """After the rotation the first key (pinned at provisioning) signs nothing the terminal
    takes: a host still using it is refused."""
    first_key, root, online = HostKey.generate(), HostKey.generate(), HostKey.generate()
    terminal = Terminal.provision(tmp_path, "BUS-REVOKED")
    kept = RootFile(terminal.data_dir / ROOT_FILE, pinned_root([first_key.public_key_bytes]))
    kept.update(statement(1, [root], [first_key, root], [online]))
    stale = make_host(SqliteStorage(tmp_path / "host.db"), first_key)
    stale.storage.publish_blacklist(add=[0x42], remove=[])
    with HostServer(create_app(stale)) as server:
        daemon = daemon_for(terminal, fast_settings(server.url, first_key))
        try:
            assert daemon.root is not None and daemon.root.current.version == 1
            with pytest.raises(ListRejected, match="not a signing key in force"):
                daemon.pull_blacklist()
        finally:
            daemon.close()
    assert isinstance(kept.current, TrustRoot)


def test_cardhost_creates_root_keys_and_signs_a_rotation(tmp_path: Path) -> None:
    """``cardhost root-key`` writes keys 0600; ``root-sign`` writes a statement and adds a
    countersignature; the host refuses to serve a chain that does not name its key."""
    old, root, online = tmp_path / "old.key", tmp_path / "root.key", tmp_path / "online.key"
    for path in (old, root, online):
        assert cardhost.main(["root-key", "--key", str(path)]) == 0
        assert path.stat().st_mode & 0o777 == 0o600
    keys = {p: HostKey.load(p) for p in (old, root, online)}
    out = tmp_path / "root-1.json"
    args = ["root-sign", "--out", str(out), "--version", "1", "--key", str(old)]
    args += ["--root-public", keys[root].public_key_hex()]
    args += ["--signing-public", keys[online].public_key_hex()]
    assert cardhost.main(args) == 0
    pinned = pinned_root([keys[old].public_key_bytes])
    with pytest.raises(RootRejected, match="its own root keys"):  # not yet countersigned
        verify_root_statement(out.read_bytes(), pinned)
    assert cardhost.main(["root-sign", "--add-to", str(out), "--key", str(root)]) == 0
    rotated = verify_root_statement(out.read_bytes(), pinned)
    assert rotated.signing_keys == (keys[online].public_key_bytes,)
    check_root_statements([out.read_bytes()], keys[online])
    with pytest.raises(RootRejected, match="does not name this host's key"):
        check_root_statements([out.read_bytes()], keys[old])
