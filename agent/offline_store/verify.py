"""Chain verification, export to JSON Lines and the matching reader."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from agent.errors import StoreError
from agent.offline_store.device_key import signature_verifier
from agent.offline_store.records import (
    GENESIS_HASH,
    Record,
    hash_hex,
    record_from_json,
    record_to_json,
)

if TYPE_CHECKING:
    from agent.offline_store.store import OfflineStore


@dataclass
class VerifyReport:
    ok: bool
    checked: int
    problems: list[str] = field(default_factory=list)


def verify_chain(
    records: Iterable[Record],
    public_key_raw: bytes,
    *,
    anchor_seq: int = 0,
    anchor_hash: str = GENESIS_HASH,
    expected_last_seq: int | None = None,
    expected_last_hash: str | None = None,
) -> VerifyReport:
    """Check sequence, links, hashes and signatures of ``records`` (in the order given).

    ``anchor_seq``/``anchor_hash`` name the record just before the first one expected;
    ``expected_last_seq``/``expected_last_hash`` (the store's meta) reveal a truncated tail.
    Raises ``ValueError`` if ``public_key_raw`` is not an Ed25519 public key.
    """
    checker = ChainChecker(public_key_raw, anchor_seq=anchor_seq, anchor_hash=anchor_hash)
    for record in records:
        checker.check(record)
    return checker.finish(
        expected_last_seq=expected_last_seq, expected_last_hash=expected_last_hash
    )


class KeyEpochs:
    """Which device key signed which records: ``[(first seq, raw public key), ...]`` in seq
    order. One epoch until a key rotation; the new key signs from the cut-over on
    (:meth:`agent.offline_store.store.OfflineStore.rotate_key`)."""

    def __init__(self, epochs: Sequence[tuple[int, bytes]]) -> None:
        if not epochs:
            raise ValueError("at least one device key")
        self.firsts = [first for first, _ in epochs]
        self.keys = [key for _, key in epochs]
        self._verifiers = [signature_verifier(key) for key in self.keys]

    def index(self, seq: int) -> int:
        return max(0, bisect.bisect_right(self.firsts, seq) - 1)

    def verifier(self, seq: int) -> Callable[[bytes, bytes], bool]:
        """The signature check of the key that signs record ``seq``."""
        return self._verifiers[self.index(seq)]

    def key_for(self, seq: int) -> bytes:
        return self.keys[self.index(seq)]


class ChainChecker:
    """Incremental form of :func:`verify_chain`, which also accepts rows that failed to parse."""

    def __init__(
        self, public_key_raw: bytes | KeyEpochs, *, anchor_seq: int, anchor_hash: str
    ) -> None:
        self._epochs = (
            public_key_raw
            if isinstance(public_key_raw, KeyEpochs)
            else KeyEpochs([(0, public_key_raw)])
        )
        self._anchor_seq = anchor_seq
        self._last_seq = anchor_seq
        self._last_hash: str | None = anchor_hash
        self._checked = 0
        self._problems: list[str] = []

    def check(self, record: Record) -> None:
        seq = record.seq
        if not self._advance(seq):
            self._check_seal(record)
            return
        if self._last_hash is not None and record.prev_hash != self._last_hash:
            self._problems.append(
                f"record {seq} does not link to {self._predecessor_name()}: prev_hash mismatch "
                "(records reordered, replaced or re-linked)"
            )
        self._check_seal(record)
        self._last_seq = seq
        self._last_hash = record.hash

    def unreadable(self, seq: int, reason: str) -> None:
        """A stored row at ``seq`` that could not be turned into a :class:`Record`."""
        self._problems.append(f"record {seq} unreadable: {reason}")
        if self._advance(seq):
            self._last_seq = seq
            self._last_hash = None

    def quarantined(self, seq: int, reason: str, chain_hash: str) -> None:
        """A record the store has quarantined: named as a problem; the chain goes on from the
        hash it had when it was written (its own content cannot be checked)."""
        self._problems.append(f"record {seq} quarantined: {reason} (kept verbatim, reported)")
        if self._advance(seq):
            self._last_seq = seq
            self._last_hash = chain_hash

    def problem(self, description: str) -> None:
        """A problem found outside the record stream (for example in the store's meta)."""
        self._problems.append(description)

    def finish(
        self, *, expected_last_seq: int | None = None, expected_last_hash: str | None = None
    ) -> VerifyReport:
        last = self._last_seq
        if expected_last_seq is not None:
            if last < expected_last_seq:
                self._problems.append(
                    f"{_describe_range(last + 1, expected_last_seq)} missing at the end"
                )
            elif last > expected_last_seq:
                self._problems.append(
                    f"{_describe_range(expected_last_seq + 1, last)} beyond the store's "
                    f"last sequence {expected_last_seq}"
                )
            elif (
                expected_last_hash is not None
                and self._last_hash is not None
                and self._last_hash != expected_last_hash
            ):
                self._problems.append(f"record {last} does not match the store's last hash")
        return VerifyReport(ok=not self._problems, checked=self._checked, problems=self._problems)

    def _advance(self, seq: int) -> bool:
        """Count the record; report gaps; False if it is out of order (and must not be linked)."""
        self._checked += 1
        if seq <= self._last_seq:
            self._problems.append(
                f"record {seq} out of order: it comes after {self._predecessor_name()}"
            )
            return False
        if seq > self._last_seq + 1:
            self._problems.append(
                f"{_describe_range(self._last_seq + 1, seq - 1)} missing: "
                f"sequence jumps from {self._last_seq} to {seq}"
            )
            self._last_hash = None
        return True

    def _check_seal(self, record: Record) -> None:
        if hash_hex(record.canonical_bytes()) != record.hash:
            self._problems.append(
                f"record {record.seq} altered: its contents do not match its hash"
            )
        elif not self._epochs.verifier(record.seq)(
            bytes.fromhex(record.signature), bytes.fromhex(record.hash)
        ):
            self._problems.append(
                f"record {record.seq} has a bad signature (forged, or signed by another key)"
            )

    def _predecessor_name(self) -> str:
        if self._last_seq == self._anchor_seq:
            return f"the chain anchor (seq {self._anchor_seq})"
        return f"record {self._last_seq}"


def export_records(
    store: OfflineStore,
    out: IO[str],
    *,
    since_seq: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write the records after ``since_seq`` as JSON Lines; returns how many were written.

    ``progress(done, total)`` is called every 500 records and at the end.
    """
    total = max(store.last_seq() - since_seq, 0)
    written = 0
    for record in store.records(since_seq=since_seq):
        out.write(record_to_json(record))
        out.write("\n")
        written += 1
        if progress is not None and written % 500 == 0:
            progress(written, total)
    if progress is not None:
        progress(written, max(total, written))
    return written


def load_exported(lines: Iterable[str]) -> list[Record]:
    """Read :func:`export_records` output; blank lines are skipped. Malformed input: StoreError."""
    loaded: list[Record] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            loaded.append(record_from_json(line))
        except (ValueError, TypeError) as exc:
            raise StoreError(f"store: exported line {line_number} is not a record: {exc}") from exc
    return loaded


def _describe_range(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}..{last}"
