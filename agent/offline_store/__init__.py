"""The offline store: intent journal and signed, hash-chained transaction records (SQLite)."""

from agent.offline_store.device_key import DeviceKey, verify_signature
from agent.offline_store.records import GENESIS_HASH, QuarantineNotice, Record, RecordBody
from agent.offline_store.store import Intent, IntentNotFoundError, OfflineStore, QuarantinedRecord
from agent.offline_store.verify import VerifyReport, export_records, load_exported, verify_chain

__all__ = [
    "GENESIS_HASH",
    "DeviceKey",
    "Intent",
    "IntentNotFoundError",
    "OfflineStore",
    "QuarantineNotice",
    "QuarantinedRecord",
    "Record",
    "RecordBody",
    "VerifyReport",
    "export_records",
    "load_exported",
    "verify_chain",
    "verify_signature",
]
