"""``cardhost audit``: re-verify what the host stored, record by record (I/O around
:func:`clearinghost.clearing.audit_rows`).

A signed batch is accepted on one device signature over its head plus the hash chain of its
records (``sync.protocol``); each record keeps its own device signature as the terminal's
evidence. The audit re-verifies, for every terminal, every stored slot after its cursor up to
the terminal's acknowledgement: the body parses, its hash is the SHA-256 of its canonical
encoding, it links to the slot before, and its own signature verifies under the key of the
batch that stored it (the terminal's registered key for a v1 record, or any key the terminal
had when no batch names one); and every stored batch signature in that range verifies and still
ends at the hash the host holds. Findings become anomalies (``audit_*`` kinds, one per record)
and the cursor moves in the same transaction, so a second run adds nothing.

A record whose own signature is bad while its chain and batch signature were good came from the
terminal (the batch signature proved it) with a broken seal: a terminal fault the operator
follows up. A bad hash or link, or a batch signature that no longer verifies, means the host's
own database changed after the fact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from agent.offline_store.device_key import signature_verifier
from clearinghost.clearing import AuditState, Finding, audit_batch_head, audit_rows
from clearinghost.storage import Storage

log = structlog.get_logger(__name__)

AUDIT_PAGE = 2000  # slots read and verified per transaction


@dataclass
class AuditReport:
    """What one audit run did: slots and batch signatures re-verified, findings by terminal."""

    records: int = 0
    batches: int = 0
    terminals: int = 0
    findings: list[tuple[str, int, Finding]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "terminals": self.terminals,
            "records": self.records,
            "batches": self.batches,
            "findings": [
                {"terminal_id": t, "seq": s, "kind": f.kind, "detail": f.detail}
                for t, s, f in self.findings
            ],
        }


class _Keys:
    """The verifier for each seq of one terminal: the key of the signed batch that stored it,
    else any key the terminal is known to have had."""

    def __init__(self, current: str, batches: list[tuple[int, int, str]]) -> None:
        self._batches = batches
        self._cache: dict[str, Callable[[bytes, bytes], bool]] = {}
        known = [current, *dict.fromkeys(key for _f, _l, key in batches)]
        self._any = [self.verifier(key) for key in dict.fromkeys(known)]

    def verifier(self, key: str) -> Callable[[bytes, bytes], bool]:
        verify = self._cache.get(key)
        if verify is None:
            verify = signature_verifier(bytes.fromhex(key))
            self._cache[key] = verify
        return verify

    def for_seq(self, seq: int) -> Callable[[bytes, bytes], bool]:
        # the batches of one page are few (a page spans a handful of batches)
        for first, last, key in self._batches:
            if first <= seq <= last:
                return self.verifier(key)
        any_key = self._any

        def verify(signature: bytes, data: bytes) -> bool:
            return any(v(signature, data) for v in any_key)

        return verify


def audit_storage(
    storage: Storage, terminal_id: str | None = None, page: int = AUDIT_PAGE
) -> AuditReport:
    """Audit every terminal (or one) from its cursor to its acknowledgement."""
    report = AuditReport()
    terminals = storage.terminals()
    for terminal in terminals:
        if terminal_id is not None and terminal.terminal_id != terminal_id:
            continue
        report.terminals += 1
        _audit_terminal(
            storage, terminal.terminal_id, terminal.public_key, terminal.ack_seq, page, report
        )
    log.info(
        "audit done",
        terminals=report.terminals,
        records=report.records,
        batches=report.batches,
        findings=len(report.findings),
    )
    return report


def _audit_terminal(
    storage: Storage,
    terminal_id: str,
    public_key: str,
    through: int,
    page: int,
    report: AuditReport,
) -> None:
    seq, hash_ = storage.audit_cursor(terminal_id)
    state = AuditState(seq, hash_)
    while state.seq < through:
        rows = storage.audit_rows(terminal_id, state.seq, through, page)
        if not rows:
            break
        start = state.seq
        keys = _Keys(public_key, storage.batch_keys(terminal_id, rows[0].seq, rows[-1].seq))
        found: list[tuple[int, Finding]] = []
        for row in rows:  # per row: each may come under another batch's key
            found += audit_rows([row], terminal_id, state, keys.for_seq(row.seq))
        for head, held in storage.batch_heads(terminal_id, start, state.seq):
            report.batches += 1
            finding = audit_batch_head(
                terminal_id, head.fields, head.signature, held, keys.verifier(head.public_key)
            )
            if finding is not None:
                found.append((int(head.fields["last_seq"]), finding))
        storage.save_audit(terminal_id, state.seq, state.hash, found)
        report.records += len(rows)
        report.findings += [(terminal_id, at, finding) for at, finding in found]
        for at, finding in found:
            log.warning("audit finding", terminal_id=terminal_id, seq=at, kind=finding.kind)
