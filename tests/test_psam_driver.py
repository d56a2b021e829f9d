"""PsamDriver over the PSAM simulator, SoftwareSam, SamCore and KeySet (cpu-purse.md §4, §5.8)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.crypto import Algorithm
from agent.errors import (
    ConfigurationError,
    SamError,
    SamMuteError,
    SamProtocolError,
    SamStatusError,
)
from agent.sam.base import PurchaseMacRequest, Sam
from agent.sam.keys import KeySet
from agent.sam.psam import (
    PsamConfig,
    PsamDriver,
    application_path,
    cipher_data_mac,
    credit_sam_for_purchase,
    init_for_descrypt,
    init_sam_for_purchase,
    read_binary_sfi,
)
from agent.sam.software import SamCore, SoftwareSam
from tests.fake_reader.inprocess import InProcessSamSlot
from tests.fake_reader.psam import SimulatedPsam, multi_application_psam

TERMINAL = bytes.fromhex("000000000024")
SERIAL = bytes.fromhex("23010101000000212241")
ASN = bytes.fromhex("5170070104791381")
ISSUER = bytes.fromhex("01011000FFFFFFFF")

KEYS: list[dict[str, Any]] = [
    {"usage": "purchase", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "404142434445464748494A4B4C4D4E4F"},
    {"usage": "purchase", "index": 1, "version": 1, "algorithm": 4, "levels": 2,
     "key": "0123456789ABCDEFFEDCBA9876543210"},
    {"usage": "tac", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "505152535455565758595A5B5C5D5E5F"},
    {"usage": "maintenance", "index": 1, "version": 1, "algorithm": 0, "levels": 2,
     "key": "606162636465666768696A6B6C6D6E6F"},
]  # fmt: skip

# §5.8 request (vectors C2/C3).
REQUEST = PurchaseMacRequest(
    card_random=bytes.fromhex("A1B2C3D4"),
    card_counter=5,
    amount=0x64,
    transaction_type=0x09,
    when=dt.datetime(2024, 1, 1, 12, 0, 0),
    key_version=1,
    algorithm=0,
    factors=(ASN, ISSUER),
)
INIT_8070 = bytes.fromhex(
    "8070000024A1B2C3D400050000006409202401011200000100517007010479138101011000FFFFFFFF08"
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


@pytest.fixture
def keyset() -> KeySet:
    return KeySet.from_mapping(KEYS)


def make_core(keyset: KeySet, ttc: int = 0x10, **kwargs) -> SamCore:
    return SamCore(keyset, TERMINAL, SERIAL, ttc=ttc, **kwargs)


def driver_for(psam: SimulatedPsam, config: PsamConfig | None = None) -> PsamDriver:
    driver = PsamDriver(InProcessSamSlot(psam), config)
    driver.open()
    return driver


class ScriptedSlot:
    """A SamSlot answering from a script (for malformed / refused answers)."""

    name = "scripted"

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = list(answers)
        self.sent: list[bytes] = []

    def reset(self) -> bytes:
        return b"\x3b\x00"

    def transmit(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        return self.answers.pop(0)

    def close(self) -> None:
        pass


OPEN_ANSWERS = [h("9000"), SERIAL + h("01010101 9000"), TERMINAL + h("9000"), h("9000"),
                h("01") + bytes(24) + h("9000")]  # fmt: skip


# -- command builders (sans-I/O) -------------------------------------------------------------


def test_builders_match_transcript() -> None:
    assert init_sam_for_purchase(REQUEST).to_bytes() == INIT_8070
    assert credit_sam_for_purchase(h("D06E03F3")).to_bytes() == h("8072000004D06E03F3")
    assert init_for_descrypt(0x45, 0x01, [ASN, ISSUER]).to_bytes() == h(
        "801A450110517007010479138101011000FFFFFFFF"
    )
    assert cipher_data_mac(h("11223344 00000000 841E000004800000")).to_bytes() == h(
        "80FA050010 11223344 00000000 841E000004800000"
    )
    assert read_binary_sfi(0x16, 6).to_bytes() == h("00B0960006")


def test_builder_lc_follows_factor_count() -> None:
    for n in (1, 2, 3):
        request = PurchaseMacRequest(
            card_random=REQUEST.card_random,
            card_counter=5,
            amount=1,
            transaction_type=6,
            when=REQUEST.when,
            key_version=1,
            algorithm=0,
            factors=(ASN,) * n,
        )
        raw = init_sam_for_purchase(request).to_bytes()
        assert raw[4] == 0x14 + 8 * n and raw[-1] == 0x08


# -- PsamDriver against the simulated PSAM ------------------------------------------------------


def test_open_sequence_and_identity(keyset: KeySet) -> None:
    psam = SimulatedPsam(make_core(keyset, purchase_key_index=2))
    driver = driver_for(psam)
    assert psam.commands == [
        h("00A40000023F00"),
        h("00B095000E"),
        h("00B0960006"),
        h("00A4040010A0000006324D4F542E435053414D3031"),
        h("00B0970019"),
    ]
    assert driver.terminal_number == TERMINAL
    assert driver.serial == SERIAL.hex().upper()
    assert driver.purchase_key_index == 2
    assert isinstance(driver, Sam)


def test_purchase_transcript(keyset: KeySet) -> None:
    psam = SimulatedPsam(make_core(keyset))
    driver = driver_for(psam)
    mac = driver.init_for_purchase(REQUEST)
    assert (mac.ttc, mac.mac1) == (0x10, h("B7ADB8CD"))
    driver.credit_for_purchase(h("D06E03F3"))
    assert psam.commands[-2:] == [INIT_8070, h("8072000004D06E03F3")]
    # SESPK is kept for the recovery path: a second 80 72 works too.
    driver.credit_for_purchase(h("D06E03F3"))
    with pytest.raises(SamStatusError) as info:
        driver.credit_for_purchase(h("D06E03F4"))
    assert info.value.sw == 0x9302
    assert psam.core.ttc == 0x11


def test_credit_without_session_is_refused(keyset: KeySet) -> None:
    driver = driver_for(SimulatedPsam(make_core(keyset)))
    with pytest.raises(SamStatusError) as info:
        driver.credit_for_purchase(h("D06E03F3"))
    assert info.value.sw == 0x9302


def test_wrong_factor_count_and_unknown_key(keyset: KeySet) -> None:
    driver = driver_for(SimulatedPsam(make_core(keyset)))
    with pytest.raises(SamStatusError) as info:
        driver.init_for_purchase(PurchaseMacRequest(**{**_fields(REQUEST), "factors": (ASN,)}))
    assert info.value.sw == 0x6700
    with pytest.raises(SamStatusError) as info:
        driver.init_for_purchase(PurchaseMacRequest(**{**_fields(REQUEST), "key_version": 9}))
    assert info.value.sw == 0x6A88


def _fields(request: PurchaseMacRequest) -> dict[str, Any]:
    return {name: getattr(request, name) for name in request.__dataclass_fields__}


def test_application_block_mac_vector_d(keyset: KeySet) -> None:
    driver = driver_for(SimulatedPsam(make_core(keyset)))
    driver.cipher_init(0x45, 0x01, [ASN, ISSUER])
    mac = driver.cipher_mac(h("11223344 00000000 841E000004800000"))
    assert mac == h("D2AD05F0")


def test_tac_recomputation_with_tac_key(keyset: KeySet) -> None:
    # P4: 801A 4C (2-level, type 0C TAC in S4 numbering) + 80FA with zero IV: the C4 TAC.
    driver = driver_for(SimulatedPsam(make_core(keyset)))
    driver.cipher_init(0x4C, 0x01, [ASN, ISSUER])
    data = h("00000064 09 000000000024 00000010 20240101 120000 8000")
    assert driver.cipher_mac(bytes(8) + data) == h("8D8715C6")


def test_t0_get_response_is_followed(keyset: KeySet) -> None:
    psam = SimulatedPsam(make_core(keyset), t0_get_response=True)
    driver = driver_for(psam)
    assert driver.terminal_number == TERMINAL
    assert driver.init_for_purchase(REQUEST).mac1 == h("B7ADB8CD")
    assert h("00C0000008") in psam.commands


def test_read_order_option(keyset: KeySet) -> None:
    config = PsamConfig(read_ids_before_application=False)
    with pytest.raises(SamStatusError) as info:
        driver_for(SimulatedPsam(make_core(keyset)), config)  # EF16 lives under the MF
    assert info.value.sw == 0x6A82
    psam = SimulatedPsam(make_core(keyset), mf_files_visible_in_application=True)
    driver = driver_for(psam, config)
    assert driver.terminal_number == TERMINAL


@pytest.mark.parametrize(
    ("config", "select"),
    [
        (PsamConfig.cjt166(), [h("00A40000021001"), h("00A4040006BDA8C9E8B2BF")]),
        (PsamConfig.tunion(by_fid=True), [h("00A40000028011")]),
    ],
)
def test_other_application_selections(
    keyset: KeySet, config: PsamConfig, select: list[bytes]
) -> None:
    psam = SimulatedPsam(make_core(keyset))
    driver = driver_for(psam, config)
    assert psam.commands[3:-1] == select
    assert driver.init_for_purchase(REQUEST).mac1 == h("B7ADB8CD")


def test_mute_psam(keyset: KeySet) -> None:
    psam = SimulatedPsam(make_core(keyset))
    driver = driver_for(psam)
    psam.faults.add(len(psam.commands) + 1, "mute")
    with pytest.raises(SamMuteError):
        driver.init_for_purchase(REQUEST)
    # The next command resets and re-opens the PSAM first; its session died with the reset.
    with pytest.raises(SamStatusError, match="9302"):
        driver.credit_for_purchase(h("D06E03F3"))
    assert driver.init_for_purchase(REQUEST).ttc == 0x10  # the torn 80 70 never ran


def test_not_opened() -> None:
    driver = PsamDriver(ScriptedSlot([]))
    with pytest.raises(SamError):
        _ = driver.terminal_number
    with pytest.raises(SamError):
        _ = driver.purchase_key_index


# -- malformed / refused answers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (h("00000010B7AD 9000"), SamProtocolError),  # 6 data bytes
        (h("00000010B7ADB8CD00 9000"), SamProtocolError),  # 9 data bytes
        (h("90"), SamProtocolError),  # no status word
        (h("6985"), SamStatusError),
        (h("1234"), SamStatusError),  # unknown status word
    ],
)
def test_bad_8070_answers(answer: bytes, error: type[Exception]) -> None:
    slot = ScriptedSlot([*OPEN_ANSWERS, answer])
    driver = PsamDriver(slot)
    driver.open()
    with pytest.raises(error):
        driver.init_for_purchase(REQUEST)
    assert slot.sent[-1] == INIT_8070


def test_bad_open_answers() -> None:
    answers = list(OPEN_ANSWERS)
    answers[2] = h("0000000000 9000")  # 5-byte terminal number
    with pytest.raises(SamProtocolError):
        PsamDriver(ScriptedSlot(answers)).open()
    answers = list(OPEN_ANSWERS)
    answers[3] = h("6A82")
    with pytest.raises(SamStatusError):
        PsamDriver(ScriptedSlot(answers)).open()


def test_8072_with_data_is_a_protocol_error() -> None:
    driver = PsamDriver(ScriptedSlot([*OPEN_ANSWERS, h("01 9000")]))
    driver.open()
    with pytest.raises(SamProtocolError):
        driver.credit_for_purchase(h("D06E03F3"))
    with pytest.raises(SamProtocolError):
        driver.credit_for_purchase(h("D06E03"))


# -- SoftwareSam ----------------------------------------------------------------------------------


def test_software_sam_refused_for_production(keyset: KeySet) -> None:
    with pytest.raises(ConfigurationError, match="production profile"):
        SoftwareSam.for_profile("production", make_core(keyset))
    with pytest.raises(ConfigurationError):
        SoftwareSam(make_core(keyset), allow_test_keys=False)
    assert isinstance(SoftwareSam.for_profile("test", make_core(keyset)), Sam)


@pytest.mark.parametrize("algorithm", [0, 4])
def test_software_sam_and_driver_agree(keyset: KeySet, algorithm: int) -> None:
    request = PurchaseMacRequest(**{**_fields(REQUEST), "algorithm": algorithm})
    software = SoftwareSam.for_profile("test", make_core(keyset))
    driver = driver_for(SimulatedPsam(make_core(keyset)))
    assert software.init_for_purchase(request) == driver.init_for_purchase(request)
    assert software.terminal_number == driver.terminal_number
    assert software.serial == driver.serial
    assert software.purchase_key_index == driver.purchase_key_index


def test_ttc_persistence_callback(keyset: KeySet) -> None:
    saved: list[int] = []
    sam = SoftwareSam.for_profile("test", make_core(keyset, ttc=7, on_ttc_change=saved.append))
    assert sam.init_for_purchase(REQUEST).ttc == 7
    assert sam.init_for_purchase(REQUEST).ttc == 8
    assert saved == [8, 9]
    restarted = make_core(keyset, ttc=saved[-1])
    assert restarted.init_for_purchase(REQUEST).ttc == 9


def test_factor_order_option(keyset: KeySet) -> None:
    reversed_order = make_core(keyset, apdu_order_card_first=False)
    assert reversed_order.init_for_purchase(REQUEST).mac1 != h("B7ADB8CD")


def test_sam_core_validation(keyset: KeySet) -> None:
    with pytest.raises(ConfigurationError):
        SamCore(keyset, TERMINAL[:5], SERIAL)
    with pytest.raises(ConfigurationError):
        SamCore(keyset, TERMINAL, SERIAL, sm4_session_key="nope")
    assert "40414243" not in repr(make_core(keyset))


# -- KeySet ---------------------------------------------------------------------------------------


def test_keyset_lookup(keyset: KeySet) -> None:
    tdes = keyset.by_index("purchase", 1)
    sm4 = keyset.by_index("purchase", 1, Algorithm.SM4)
    assert tdes is not None and tdes.algorithm == Algorithm.TDES
    assert sm4 is not None and sm4.key == h(KEYS[1]["key"])
    assert keyset.by_version("tac", 1, Algorithm.TDES) is not None
    assert keyset.by_version("tac", 1, Algorithm.SM4) is None
    assert len(keyset) == 4


def test_keyset_repr_hides_keys(keyset: KeySet) -> None:
    for text in (repr(keyset), repr(next(iter(keyset))), str(next(iter(keyset)))):
        assert "4041424344" not in text.upper()
        assert "purchase" in text


def test_keyset_from_profile_mapping() -> None:
    keyset = KeySet.from_mapping({"keys": KEYS[:1]})
    assert len(keyset) == 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({k: v for k, v in KEYS[0].items() if k != "levels"}, "missing field"),
        ({**KEYS[0], "key": "40414243444546474849ZZ4B4C4D4E4F"}, "not valid hex"),
        ({**KEYS[0], "key": "4041424344454647"}, "16 bytes"),
        ({**KEYS[0], "algorithm": 1}, "algorithm"),
        ({**KEYS[0], "usage": "bogus"}, "usage"),
        ({**KEYS[0], "index": "1"}, "integer"),
        ({**KEYS[0], "levels": 5}, "levels"),
    ],
)
def test_keyset_errors(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        KeySet.from_mapping([entry])
    assert "test_keys.keys[0]" in str(info.value)
    assert "ZZ" not in str(info.value)


def test_keyset_duplicates() -> None:
    with pytest.raises(ConfigurationError, match="duplicate"):
        KeySet.from_mapping([KEYS[0], {**KEYS[0], "version": 2}])
    with pytest.raises(ConfigurationError, match="duplicate"):
        KeySet.from_mapping([KEYS[0], {**KEYS[0], "index": 2}])


# -- robustness ------------------------------------------------------------------------------------

_FUZZ_PSAM = SimulatedPsam(
    SamCore(KeySet.from_mapping(KEYS), TERMINAL, SERIAL, ttc=1), t0_get_response=True
)
_PSAM_HEADERS = [h(x) for x in ("00A40400", "00A40000", "00B09500", "00B09700", "80700000",
                                "80720000", "801A4501", "801A4C01", "80FA0500", "80FA0000",
                                "80CA0000", "00C00000")]  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_PSAM_HEADERS), st.binary(max_size=48)), max_size=8))
def test_random_psam_commands_never_raise(commands: list[tuple[bytes, bytes]]) -> None:
    _FUZZ_PSAM.reset()
    _FUZZ_PSAM.process(h("00A4040010A0000006324D4F542E435053414D3031"))
    for header, body in commands:
        apdu = header + bytes((len(body),)) + body if body else header
        assert len(_FUZZ_PSAM.process(apdu)) >= 2
    assert len(_FUZZ_PSAM.process(bytes(commands[0][1]) if commands else b"")) >= 2
    assert not _FUZZ_PSAM.internal_errors


# -- several applications in one PSAM (issue 8, item 2) ----------------------------------------

CJT_KEYS: list[dict[str, Any]] = [
    {"usage": "purchase", "index": 2, "version": 2, "algorithm": 0, "levels": 2,
     "key": "808182838485868788898A8B8C8D8E8F"},
]  # fmt: skip


def two_application_psam(keyset: KeySet) -> SimulatedPsam:
    cjt_core = SamCore(KeySet.from_mapping(CJT_KEYS), TERMINAL, SERIAL, purchase_key_index=2)
    return multi_application_psam(make_core(keyset), cjt_core)


def test_application_switch_selects_only_when_needed_and_reads_ef17_per_application(
    keyset: KeySet,
) -> None:
    psam = two_application_psam(keyset)
    driver = driver_for(psam)
    opened = len(psam.commands)
    driver.select_application(application_path("tunion"))
    assert len(psam.commands) == opened, "already selected: no APDU"

    driver.select_application(application_path("cjt166"))
    assert psam.commands[opened:] == [
        h("00A40000023F00"),
        h("00A40000021001"),
        h("00A4040006BDA8C9E8B2BF"),
        h("00B0970019"),
    ]
    assert driver.purchase_key_index == 2
    assert driver.terminal_number == TERMINAL  # EF16 is the MF's: not read again
    assert driver.current_application == application_path("cjt166")

    switched = len(psam.commands)
    driver.select_application(application_path("tunion"))
    assert psam.commands[switched:] == [
        h("00A40000023F00"),
        h("00A4040010A0000006324D4F542E435053414D3031"),
    ], "EF17 of an application already read is not read again"
    assert driver.purchase_key_index == 1


def test_wrong_application_fails_80ca_and_8070(keyset: KeySet) -> None:
    psam = two_application_psam(keyset)
    driver = driver_for(psam)  # the T-Union application
    with pytest.raises(SamStatusError) as info:
        driver.verify_security_code(bytes(9))
    assert info.value.sw == 0x6985
    cjt_request = PurchaseMacRequest(**{**_fields(REQUEST), "key_version": 2})
    with pytest.raises(SamStatusError) as info:
        driver.init_for_purchase(cjt_request)
    assert info.value.sw == 0x6A88

    driver.select_application(application_path("cjt166"))
    driver.verify_security_code(bytes(9))
    assert driver.init_for_purchase(cjt_request).ttc == 0
    with pytest.raises(SamStatusError) as info:
        driver.init_for_purchase(REQUEST)  # a T-Union key version in the CJ/T 166 application
    assert info.value.sw == 0x6A88
    assert psam.application("tunion").core.ttc == 0x10  # each application its own TTC (EF19)


def test_lenient_default_psam_answers_every_name(keyset: KeySet) -> None:
    """The default simulated PSAM keeps the old model: one application under every name."""
    psam = SimulatedPsam(make_core(keyset))
    driver = driver_for(psam, PsamConfig.cjt166())
    driver.verify_security_code(bytes(9))
    driver.select_application(application_path("tunion"))
    assert driver.init_for_purchase(REQUEST).ttc == 0x10


def test_application_by_fid_aid_paths() -> None:
    assert application_path("tunion") == PsamConfig.tunion().application
    assert application_path("cjt166") == PsamConfig.cjt166().application
    assert application_path(fid=h("8011")) == (("fid", h("8011")),)
    assert application_path(aid=h("A000000632"), fid=h("1001")) == (
        ("fid", h("1001")),
        ("aid", h("A000000632")),
    )
    for bad in ({"preset": "mot"}, {"fid": h("10")}, {"aid": h("A000")}, {}):
        with pytest.raises(ConfigurationError):
            application_path(**bad)
    with pytest.raises(ConfigurationError):
        application_path("tunion", fid=h("8011"))


def test_ids_read_per_application_when_not_in_the_mf(keyset: KeySet) -> None:
    psam = two_application_psam(keyset)
    psam.mf_files_visible_in_application = True
    config = PsamConfig(read_ids_before_application=False)
    driver = driver_for(psam, config)
    assert driver.terminal_number == TERMINAL
    driver.select_application(application_path("cjt166"))
    reads = [c for c in psam.commands if c[1] == 0xB0]
    assert [c[2] for c in reads] == [0x95, 0x96, 0x97, 0x95, 0x96, 0x97]


def test_reopen_after_a_mute_psam_forgets_the_selection(keyset: KeySet) -> None:
    psam = two_application_psam(keyset)
    driver = driver_for(psam)
    driver.select_application(application_path("cjt166"))
    psam.faults.add(psam._command_count + 1, "mute")
    with pytest.raises(SamMuteError):
        driver.verify_security_code(bytes(9))
    assert not driver.is_open
    # The next use re-opens (reset: the default application) and re-selects CJ/T 166.
    driver.select_application(application_path("cjt166"))
    assert driver.is_open and psam.selected_application == "cjt166"
    driver.verify_security_code(bytes(9))
