"""The sync daemon's errors. Every error says who failed: the host, the link, or this terminal.

::

    AgentError                      (agent.errors)
    └── SyncError                   the sync daemon, the link or the clearing host
        ├── HostUnreachable         connection refused or reset, timeout, TLS failure (retry)
        ├── HostError               the host answered with an error status
        │   └── HostBusy            5xx / 429 / 507 (disk full): retry later, nothing is lost
        ├── ProtocolError           the host's answer breaks the protocol (bad JSON, ack beyond
        │                           the records sent, wrong terminal)
        └── ListRejected            a signed blacklist or parameter set was refused
"""

from __future__ import annotations

from agent.errors import AgentError


class SyncError(AgentError):
    """Base of the sync daemon's errors."""

    party = "sync"


class HostUnreachable(SyncError):
    """The clearing host could not be reached or did not answer in time. Safe to retry."""

    party = "link"


class HostError(SyncError):
    """The clearing host answered with an error status (``status``, ``code`` from its body)."""

    party = "host"

    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HostBusy(HostError):
    """A transient host failure (5xx, 429, 507 disk full): retry with backoff, and not before
    ``retry_after_s`` when the host said when (its ``Retry-After``)."""

    def __init__(
        self, message: str, status: int, code: str = "", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, status, code)
        self.retry_after_s = retry_after_s


class ProtocolError(SyncError):
    """The host's answer is malformed or impossible."""

    party = "host"


class UnknownSigner(ProtocolError):
    """An answer signed by a key that is not a signing key in force (perhaps a rotation the
    terminal has not yet learnt: it fetches the root statements and tries once more)."""


class ListRejected(SyncError):
    """A signed list (blacklist, parameter set) was refused: forged, older, expired, corrupt."""

    party = "host"
