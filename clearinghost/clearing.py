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

Two ways a batch proves where it comes from (``sync.protocol``): a v1 upload has every record's
device signature verified (:func:`screen`); a signed batch has one device signature over its
head (terminal, seq range, count, the last entry's hash and the SHA-256 of the whole body) and
then each record's hash recomputed (:func:`screen_signed`), the chain being checked by the
storage as before. The body digest puts every byte of every line under that one signature; the
hash chain ties each record to its predecessor and to what the host already holds. Each
record's own signature is kept as the terminal's evidence and re-verified by the audit
(:func:`audit_rows`, ``cardhost audit``), which flags a record whose own signature is bad (a
terminal bug: the batch signature proved where it came from) and re-checks the stored chain and
batch signatures.

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
from typing import TypeVar

from agent import crypto
from agent.crypto import Algorithm, CryptoError
from agent.offline_store.device_key import signature_verifier
from agent.offline_store.records import (
    QuarantineNotice,
    Record,
    entry_from_json,
    hash_hex,
)
from agent.sam.keys import KeySet
from sync.protocol import RecordLine, SignedEntry, batch_head, batch_signed_bytes


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

    accepted: list[Record | QuarantineNotice | RecordLine]
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
    record: Record | RecordLine,
    seal: Callable[[Record], Finding | None],
    tac: TacVerifier | None,
) -> list[Finding]:
    """Every finding for one newly stored record."""
    findings: list[Finding] = []
    if isinstance(record, RecordLine):
        sealed = None  # a signed batch's record: its hash is checked by screen_signed
        # TACs are of CPU purchases only: the full record is built for those alone
        if tac is not None and record.kind == "purchase" and record.fields.get("product") == "cpu":
            found = tac.check(record.record())
            if found is not None:
                findings.append(found)
    else:
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

    def sealed(record: Record) -> Refusal | None:
        failed = seal(record)
        return None if failed is None else Refusal(record.seq, failed.kind, failed.detail)

    return _screen(records, terminal_id, sealed, tac, notice_seal)


_Entry = TypeVar("_Entry", Record, RecordLine)


def _screen(
    entries: Sequence[_Entry | QuarantineNotice],
    terminal_id: str,
    refuse: Callable[[_Entry], Refusal | None],
    tac: TacVerifier | None,
    notice_seal: Callable[[QuarantineNotice], Finding | None] | None,
) -> Screened:
    """The walk both screens share: each notice's binding and signature, each record's
    binding and ``refuse`` (its own seal check), in order, up to the first that fails; the
    findings of each accepted entry."""
    screened = Screened([], {})
    for entry in entries:
        if isinstance(entry, QuarantineNotice):
            failed = _notice_refusal(entry, terminal_id, notice_seal)
            if failed is not None:
                screened.refusal = failed
                return screened
            screened.findings[entry.seq] = [quarantine_finding(entry)]
            screened.accepted.append(entry)
            continue
        if entry.terminal_id != terminal_id:
            screened.refusal = Refusal(
                entry.seq,
                "wrong_terminal",
                f"record {entry.seq} belongs to terminal {entry.terminal_id!r}, uploaded for "
                f"{terminal_id!r}",
            )
            return screened
        refused = refuse(entry)
        if refused is not None:
            screened.refusal = refused
            return screened
        if tac is not None or entry.kind == "unresolved":
            found = review(entry, _no_seal, tac)
            if found:
                screened.findings[entry.seq] = found
        screened.accepted.append(entry)
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


def batch_signature_refusal(
    entries: Sequence[SignedEntry],
    terminal_id: str,
    body_sha256: str,
    signature: bytes,
    verify: Callable[[bytes, bytes], bool],
) -> Refusal | None:
    """The batch signature of a signed upload: the head is rebuilt from what arrived (the
    URL's terminal, the entries' first and last seq and count, the last entry's hash, the
    body's SHA-256) and must verify under the terminal's registered key (``verify``). A
    forged signature, another terminal's key, a head made for another terminal, another range
    or another body all fail here; nothing of the batch is then stored."""
    head = batch_head(
        terminal_id,
        entries[0].seq,
        entries[-1].seq,
        len(entries),
        entries[-1].hash,
        body_sha256,
    )
    if verify(signature, batch_signed_bytes(head)):
        return None
    return Refusal(
        entries[0].seq,
        "bad_batch_signature",
        f"batch {entries[0].seq}..{entries[-1].seq} of terminal {terminal_id!r}: the batch "
        "signature does not verify under the registered device key for this terminal, range "
        "and body",
    )


def screen_signed(
    entries: Sequence[SignedEntry],
    terminal_id: str,
    tac: TacVerifier | None,
    notice_seal: Callable[[QuarantineNotice], Finding | None],
) -> Screened:
    """A signed batch (its batch signature already verified): each record's terminal binding
    and hash (the SHA-256 of its canonical encoding: what the chain links), each notice's
    binding and device signature, in order, up to the first that fails; TAC and unresolved
    findings as :func:`screen` makes them. Records' own signatures are not verified here (the
    batch signature covers their bytes): the audit does that."""

    def hashed(entry: RecordLine) -> Refusal | None:
        if entry.digest == entry.hash:
            return None
        return Refusal(entry.seq, "bad_hash", f"record {entry.seq}: contents do not match its hash")

    return _screen(entries, terminal_id, hashed, tac, notice_seal)


def _no_seal(_record: Record) -> Finding | None:
    return None


# --- the audit ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One stored slot as the audit reads it."""

    seq: int
    kind: str
    hash: str
    prev_hash: str
    body: str


@dataclass
class AuditState:
    """Where the audit of one terminal stands: the last slot audited and its hash."""

    seq: int = 0
    hash: str = "0" * 64


def audit_rows(
    rows: Sequence[AuditRow],
    terminal_id: str,
    state: AuditState,
    verify: Callable[[bytes, bytes], bool],
) -> list[tuple[int, Finding]]:
    """Re-verify stored slots of one terminal, in seq order from ``state`` (advanced here):
    each record's body parses as a record of this terminal at this seq, its hash is the
    SHA-256 of its canonical encoding and the stored hash, its ``prev_hash`` is the previous
    slot's hash, and its own device signature verifies under ``verify`` (the terminal's key);
    a quarantined slot's notice signature verifies. Returns ``(seq, finding)`` for each that
    fails (kinds ``audit_bad_signature``, ``audit_bad_hash``, ``audit_chain_break``,
    ``audit_unparsable``). A bad record signature under a good chain and batch signature is a
    terminal bug (the record did come from the terminal); a bad hash or link means the host's
    own database was changed."""
    found: list[tuple[int, Finding]] = []
    for row in rows:
        where = f"terminal {terminal_id} record {row.seq}"
        try:
            entry = entry_from_json(row.body)
        except (ValueError, TypeError, RecursionError) as exc:
            found.append(
                (row.seq, Finding("audit_unparsable", f"{where}: stored body: {str(exc)[:200]}"))
            )
            state.seq, state.hash = row.seq, row.hash
            continue
        if entry.seq != row.seq or entry.terminal_id != terminal_id:
            found.append(
                (
                    row.seq,
                    Finding(
                        "audit_unparsable",
                        f"{where}: stored body names terminal {entry.terminal_id!r} seq "
                        f"{entry.seq}",
                    ),
                )
            )
        elif isinstance(entry, QuarantineNotice):
            if not verify(bytes.fromhex(entry.signature), entry.signed_bytes()):
                found.append(
                    (
                        row.seq,
                        Finding(
                            "audit_bad_signature",
                            f"{where}: the quarantine notice's device signature does not verify",
                        ),
                    )
                )
        else:
            digest = hash_hex(entry.canonical_bytes())
            if digest != entry.hash or entry.hash != row.hash:
                found.append(
                    (row.seq, Finding("audit_bad_hash", f"{where}: contents do not match its hash"))
                )
            elif row.seq != state.seq + 1 or entry.prev_hash != state.hash:
                found.append(
                    (
                        row.seq,
                        Finding(
                            "audit_chain_break",
                            f"{where} does not link to record {state.seq} (prev_hash mismatch)",
                        ),
                    )
                )
            if not verify(bytes.fromhex(entry.signature), bytes.fromhex(entry.hash)):
                found.append(
                    (
                        row.seq,
                        Finding(
                            "audit_bad_signature",
                            f"{where}: its own device signature does not verify under the "
                            "terminal's key (the batch signature and chain proved its origin: "
                            "a terminal fault)",
                        ),
                    )
                )
        state.seq, state.hash = row.seq, row.hash
    return found


def audit_batch_head(
    terminal_id: str,
    head: dict[str, object],
    signature_hex: str,
    stored_hash: str | None,
    verify: Callable[[bytes, bytes], bool],
) -> Finding | None:
    """A stored batch signature: it verifies over its head, and the hash the host holds at the
    head's last seq is the head's ``last_hash`` (the chain still ends where it was signed)."""
    where = f"terminal {terminal_id} batch {head['first_seq']}..{head['last_seq']}"
    try:
        good = verify(bytes.fromhex(signature_hex), batch_signed_bytes(head))
    except ValueError:
        good = False
    if not good:
        return Finding("audit_bad_batch_signature", f"{where}: its signature does not verify")
    if stored_hash is not None and stored_hash != head["last_hash"]:
        return Finding(
            "audit_chain_break",
            f"{where}: the host holds another hash at seq {head['last_seq']} than the one signed",
        )
    return None
