"""The PKCS#11 key store on a real SoftHSM2 token initialised in a temporary directory
(SOFTHSM2_CONF): the same answers as the software store, the published load vectors, masters
that cannot leave the token, and a load end to end through it. Never skipped: without
SoftHSM2 these tests fail (CI installs it: scripts/bootstrap)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.crypto import Algorithm
from agent.sam.keys import KeySet, MasterKey
from clearinghost.keystore import CardKeyRef, SoftwareKeyStore, load_test_keys
from tests.fake_reader.scenario import demo_keyset
from tests.test_tearing_load import Kiosk

LIBRARIES = (
    os.environ.get("SOFTHSM2_LIB", ""),
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
LIBRARY = next((lib for lib in LIBRARIES if lib and Path(lib).exists()), None)
PIN = "1234"  # TEST token PIN
LABEL = "cardagent-test"
VECTOR_DLK = bytes.fromhex("11223344556677888877665544332211")  # cpu-purse.md §5.8 A1 (TEST)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # never skipped: CI must run it (scripts/bootstrap installs softhsm2)
    assert LIBRARY is not None and shutil.which("softhsm2-util"), (
        "SoftHSM2 missing: apt-get install softhsm2"
    )
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            LABEL,
            "--pin",
            PIN,
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from clearinghost.keystore_pkcs11 import Pkcs11KeyStore, reread_library_configuration

    assert LIBRARY is not None
    reread_library_configuration(LIBRARY)  # another test or bench may have used another token
    store = Pkcs11KeyStore(LIBRARY, LABEL, PIN)
    store.create_wrapping_key()
    for master in [*demo_keyset(), *load_test_keys()]:
        if master.usage in ("load", "tac"):
            store.import_master(master)
    store.import_master(MasterKey("load", 9, 1, Algorithm.TDES, 0, VECTOR_DLK))
    store.close()
    yield LIBRARY
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def store(token: str) -> Iterator[object]:
    from clearinghost.keystore_pkcs11 import Pkcs11KeyStore

    s = Pkcs11KeyStore(token, LABEL, PIN)
    yield s
    s.close()


def test_published_load_vectors_on_the_token(token: str) -> None:
    """§5.8 A1: SESLK from DLK 1122…2211, random 11223344, counter 0; MAC1 and MAC2."""
    from clearinghost.keystore_pkcs11 import Pkcs11KeyStore

    store = Pkcs11KeyStore(token, LABEL, PIN, levels=0)
    try:
        ref = CardKeyRef("load", 9, Algorithm.TDES, ())
        random4 = bytes.fromhex("11223344")
        mac1_data = bytes.fromhex("000000000000100001001122334455")
        assert store.load_mac1_ok(ref, random4, 0, bytes.fromhex("2988AE5A"), mac1_data)
        mac2_data = bytes.fromhex("000010000100112233445520111221214822")
        assert store.load_mac2(ref, random4, 0, mac2_data) == bytes.fromhex("3A845BF0")
    finally:
        store.close()


@pytest.mark.parametrize("algorithm", [Algorithm.TDES, Algorithm.SM4], ids=["3des", "sm4"])
def test_token_answers_like_the_software_store(store: object, algorithm: Algorithm) -> None:
    software = SoftwareKeyStore(KeySet([*demo_keyset(), *load_test_keys()]))
    factors = (bytes.fromhex("5170070104791381"), bytes.fromhex("01011000FFFFFFFF"))
    ref = CardKeyRef("load", 1, algorithm, factors)
    random4, data = bytes.fromhex("A1B2C3D4"), bytes.fromhex("0000138800000BB802000000000024")
    mac = software.load_mac2(ref, random4, 5, data)
    assert store.load_mac2(ref, random4, 5, data) == mac  # type: ignore[attr-defined]
    assert store.load_mac1_ok(ref, random4, 5, mac, data)  # type: ignore[attr-defined]
    assert not store.load_mac1_ok(ref, random4, 5, bytes(4), data)  # type: ignore[attr-defined]
    tac_args = (factors, 8000, 5, 3000, bytes.fromhex("000000000024"), bytes(7), algorithm)
    assert store.load_tac(*tac_args) == software.load_tac(*tac_args)  # type: ignore[attr-defined]


def test_masters_cannot_leave_the_token(store: object) -> None:
    import pkcs11
    from pkcs11 import Attribute

    session = store.session  # type: ignore[attr-defined]
    master = session.get_key(label="cardagent-load-1-TDES")
    assert master[Attribute.SENSITIVE] is True
    assert master[Attribute.EXTRACTABLE] is False
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        master[Attribute.VALUE]
    wrapping = session.get_key(label="cardagent-wrap")
    assert wrapping[Attribute.EXTRACTABLE] is False
    with pytest.raises(pkcs11.PKCS11Error):
        wrapping.wrap_key(master)
    with pytest.raises(pkcs11.exceptions.AttributeSensitive):
        wrapping[Attribute.VALUE]
    # the SM4 master is on the token only as ciphertext under the wrapping key
    (blob,) = session.get_objects(
        {Attribute.CLASS: pkcs11.ObjectClass.DATA, Attribute.LABEL: "cardagent-load-1-SM4"}
    )
    sm4 = next(k for k in load_test_keys() if k.algorithm == Algorithm.SM4)
    assert sm4.key not in bytes(blob[Attribute.VALUE])


@pytest.mark.parametrize("algorithm", [Algorithm.TDES, Algorithm.SM4], ids=["3des", "sm4"])
def test_load_end_to_end_through_the_token(
    tmp_path: Path, store: object, algorithm: Algorithm
) -> None:
    kiosk = Kiosk(tmp_path, keystore=store)  # type: ignore[arg-type]
    try:
        card = kiosk.card(7, algorithm)
        card.reset_command_count()
        card.faults.add(6, "tear_after")
        assert kiosk.present(card, "hsm-order").status == "torn"
        assert kiosk.present(card, "hsm-order").status == "recovered"
        assert len(card.loads) == 1
        view = kiosk.authority.view("hsm-order")
        assert view is not None and view.state == "completed"  # TAC verified through the token
    finally:
        kiosk.close()
