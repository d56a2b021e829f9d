"""Clearing checks the host runs on every uploaded record — pure functions, no storage.

A record whose terminal binding, hash or device signature fails is refused (:func:`screen`,
:class:`Refusal`: never stored); the chain is checked by the storage against the records it
holds. TAC and reconciliation findings are anomalies of stored records.

* seal: the record's hash is the SHA-256 of its canonical encoding and its signature verifies
  under the terminal's registered device key (``agent.offline_store.records``);
* TAC: for a CPU purchase, the host recomputes the card's TAC from the master TAC key of its key
  set (cpu-purse.md §5.7, §6.2 "for clearing, the host recomputes the TAC with MTK");
* reconciliation: ``unresolved`` records (a debit that could be neither proven nor disproven)
  are flagged for the operator;
* quarantine: a terminal's signed notice that its record ``seq`` is corrupted in its store
  fills that slot when its device signature verifies, and is flagged ``quarantined``.

TAC diversification factors (§5.4) are (ASN, F2) with F2 = EF15[0..7] (issuer id) for T-Union
and legacy cards, city code ‖ FF0000000000 for CJ/T 166. Records do not carry F2 yet: a record
field ``factors`` (hex of the factors as listed in PSAM 80 70, card level first, concatenated)
is used when present, else the host's configured F2 per card family; without either the record
is flagged ``tac_unverifiable``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent import crypto
from agent.crypto import Algorithm, CryptoError
from agent.offline_store.device_key import signature_verifier
from agent.offline_store.records import QuarantineNotice, Record, hash_hex
from agent.sam.keys import KeySet


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly: ``kind`` is a stable code, ``detail`` the operator's message."""

    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The first record of a batch that does not count: its seq, a stable reason code
    (``wrong_terminal``, ``bad_hash``, ``bad_signature``, ``chain_break``, ``gap``,
    ``conflict``) and the operator's message. A refused record is never stored."""

    seq: int
    reason: str
    detail: str


@dataclass
class Screened:
    """A batch after the record checks that need no storage: the records before the first
    refused one, their findings (TAC, unresolved), and the refusal if any."""

    accepted: list[Record | QuarantineNotice]
    findings: dict[int, list[Finding]]
    refusal: Refusal | None = None


@dataclass(frozen=True)
class TacVerifier:
    """Recomputes purchase TACs from a key set's TAC masters."""

    keyset: KeySet
    factor2_by_family: Mapping[str, bytes] = field(default_factory=dict)
    apdu_order_card_first: bool = True

    def check(self, record: Record) -> Finding | None:
        f = record.fields
        if record.kind != "purchase" or f.get("product") != "cpu":
            return None
        try:
            algorithm = Algorithm(int(str(f["algorithm"])))
            tac_record = bytes.fromhex(str(f["tac"]))
            factors = self._factors(f)
            if factors is None:
                return Finding(
                    "tac_unverifiable",
                    f"record {record.seq}: no diversification factor F2 for family "
                    f"{f.get('family')!r}",
                )
            masters = self.keyset.of_usage("tac", algorithm) or self.keyset.of_usage("tac")
            if not masters:
                return Finding("tac_unverifiable", f"record {record.seq}: no TAC master key")
            master = masters[0]
            dtk = crypto.diversify(
                master.key,
                list(factors[: master.levels]),
                master.algorithm,
                apdu_order_card_first=self.apdu_order_card_first,
            )
            expected = crypto.purchase_tac(
                dtk,
                record.amount,
                int(str(f["transaction_type"])),
                bytes.fromhex(str(f["terminal"])),
                int(str(f["ttc"])),
                bytes.fromhex(str(f["datetime"])),
                master.algorithm,
            )
        except (KeyError, ValueError, TypeError, CryptoError) as exc:
            return Finding("tac_unverifiable", f"record {record.seq}: {exc}")
        if not hmac.compare_digest(expected, tac_record):
            return Finding(
                "bad_tac",
                f"record {record.seq}: TAC {tac_record.hex().upper()} does not match the "
                f"recomputed {expected.hex().upper()} (card {record.card_id})",
            )
        return None

    def _factors(self, f: Mapping[str, object]) -> list[bytes] | None:
        given = f.get("factors")
        if isinstance(given, str) and given and len(given) % 16 == 0:
            raw = bytes.fromhex(given)
            return [raw[i : i + 8] for i in range(0, len(raw), 8)]
        asn = bytes.fromhex(str(f["asn"]))
        second = self.factor2_by_family.get(str(f.get("family")))
        if second is None:
            return None
        return [asn, second]


# The F2 factors of the simulated demo cards (tests/fake_reader/scenario.py): T-Union issuer id
# EF15[0..7] 01011000FFFFFFFF, CJ/T 166 city 1000 ‖ FF0000000000, legacy ADF 1001 issuer
# 1000000000000000. Test data only.
DEMO_FACTOR2: dict[str, bytes] = {
    "tunion": bytes.fromhex("01011000FFFFFFFF"),
    "cjt166": bytes.fromhex("1000FF0000000000"),
    "legacy1001": bytes.fromhex("1000000000000000"),
}


def seal_checker(public_key_raw: bytes) -> Callable[[Record], Finding | None]:
    """A check of a record's hash and device signature under one terminal's key."""
    verify = signature_verifier(public_key_raw)

    def check(record: Record) -> Finding | None:
        if hash_hex(record.canonical_bytes()) != record.hash:
            return Finding("bad_hash", f"record {record.seq}: contents do not match its hash")
        if not verify(bytes.fromhex(record.signature), bytes.fromhex(record.hash)):
            return Finding(
                "bad_signature",
                f"record {record.seq}: signature does not verify under the registered key",
            )
        return None

    return check


def notice_checker(public_key_raw: bytes) -> Callable[[QuarantineNotice], Finding | None]:
    """A check of a quarantine notice's device signature under one terminal's key."""
    verify = signature_verifier(public_key_raw)

    def check(notice: QuarantineNotice) -> Finding | None:
        if not verify(bytes.fromhex(notice.signature), notice.signed_bytes()):
            return Finding(
                "bad_signature",
                f"quarantine notice {notice.seq}: signature does not verify under the "
                "registered key",
            )
        return None

    return check


def quarantine_finding(notice: QuarantineNotice) -> Finding:
    return Finding(
        "quarantined",
        f"terminal {notice.terminal_id} record {notice.seq} is corrupted in the terminal's "
        f"store and quarantined there ({notice.reason}); {notice.raw_size} bytes of it kept on "
        f"the terminal; the chain goes on from {notice.chain_hash[:16]}…, vouched for by the "
        "device key only",
    )


def review(
    record: Record, seal: Callable[[Record], Finding | None], tac: TacVerifier | None
) -> list[Finding]:
    """Every finding for one newly stored record."""
    findings: list[Finding] = []
    sealed = seal(record)
    if sealed is not None:
        findings.append(sealed)
    if tac is not None and sealed is None:
        found = tac.check(record)
        if found is not None:
            findings.append(found)
    if record.kind == "unresolved":
        findings.append(
            Finding(
                "unresolved",
                f"record {record.seq}: debit of card {record.card_id} neither proven nor "
                f"disproven ({record.fields.get('reason', '')})",
            )
        )
    return findings


def screen(
    records: Sequence[Record | QuarantineNotice],
    terminal_id: str,
    seal: Callable[[Record], Finding | None],
    tac: TacVerifier | None,
    notice_seal: Callable[[QuarantineNotice], Finding | None] | None = None,
) -> Screened:
    """Terminal binding, hash and device signature of each record (of each quarantine notice:
    binding and signature), in order, up to the first that fails (the chain is checked
    against the host's records by the storage). Without ``notice_seal`` every notice is
    refused."""
    screened = Screened([], {})
    for record in records:
        if isinstance(record, QuarantineNotice):
            failed = _notice_refusal(record, terminal_id, notice_seal)
            if failed is not None:
                screened.refusal = failed
                return screened
            screened.findings[record.seq] = [quarantine_finding(record)]
            screened.accepted.append(record)
            continue
        if record.terminal_id != terminal_id:
            screened.refusal = Refusal(
                record.seq,
                "wrong_terminal",
                f"record {record.seq} belongs to terminal {record.terminal_id!r}, uploaded for "
                f"{terminal_id!r}",
            )
            return screened
        sealed = seal(record)
        if sealed is not None:
            screened.refusal = Refusal(record.seq, sealed.kind, sealed.detail)
            return screened
        found = review(record, lambda _record: None, tac)
        if found:
            screened.findings[record.seq] = found
        screened.accepted.append(record)
    return screened


def _notice_refusal(
    notice: QuarantineNotice,
    terminal_id: str,
    notice_seal: Callable[[QuarantineNotice], Finding | None] | None,
) -> Refusal | None:
    if notice.terminal_id != terminal_id:
        return Refusal(
            notice.seq,
            "wrong_terminal",
            f"quarantine notice {notice.seq} belongs to terminal {notice.terminal_id!r}, "
            f"uploaded for {terminal_id!r}",
        )
    failed = (
        Finding("bad_signature", f"quarantine notice {notice.seq}: no key to check it")
        if notice_seal is None
        else notice_seal(notice)
    )
    return None if failed is None else Refusal(notice.seq, failed.kind, failed.detail)
