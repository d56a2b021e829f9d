"""Sans-I/O online load (圈存) of a CPU purse, and the pure judgement of a torn one.

cpu-purse.md §3.4 (INITIALIZE FOR LOAD ``80 50 00 02``), §3.5 (CREDIT FOR LOAD ``80 52``), §3.6
(GET TRANSACTION PROVE, P2 = 02) and §6.4. The card's MAC1 goes to the clearing host, which holds
the load key; the host answers MAC2; the card's TAC goes back to the host. The terminal holds no
load key.

A load intent holds what INITIALIZE FOR LOAD said before the host was asked: the online counter
the load uses, the balance before, the amount. On the card's next presentation a fresh
INITIALIZE FOR LOAD (amount 0: nothing changes on the card) shows the counter now:

=========================  =================================  ==========================
online counter now         balance now                        decision
=========================  =================================  ==========================
= stored                   (any)                              void: the credit did not happen
= stored + 1               = before + amount                  finalize (GET TRANSACTION PROVE)
= stored + 1               anything else                      unresolved, card fault
anything else              (any)                              unresolved (another load ran)
=========================  =================================  ==========================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.apdu import Command, Party, require
from agent.errors import CardProtocolError, CardStatusError, TapRefused
from agent.products.cpu_purse import Proof, Step, get_transaction_prove
from agent.products.intents import Decision, Verdict, from_payload, to_payload

OP_LOAD = "load"
LOAD_TYPE = 0x02  # EP load (§3.10); ED load would be 01
SW_MAC2_WRONG = 0x9302


@dataclass(frozen=True, slots=True)
class LoadInit:
    """Response of INITIALIZE FOR LOAD, §3.4 (16 bytes)."""

    balance: int
    counter: int  # online sequence the load uses
    key_version: int
    algorithm: int
    random: bytes
    mac1: bytes


class Mac2Rejected(CardStatusError):
    """CREDIT FOR LOAD answered 9302: the card refused MAC2 and nothing changed (§3.5)."""


def initialize_load_command(key_index: int, amount: int, terminal: bytes) -> Command:
    data = bytes((key_index,)) + amount.to_bytes(4, "big") + terminal
    return Command(0x80, 0x50, 0x00, LOAD_TYPE, data, le=0x10, name="INITIALIZE FOR LOAD")


def credit_load_command(datetime7: bytes, mac2: bytes) -> Command:
    return Command(0x80, 0x52, 0x00, 0x00, datetime7 + mac2, le=0x04, name="CREDIT FOR LOAD")


def initialize_for_load(
    key_index: int, amount: int, terminal: bytes, max_balance: int
) -> Step[LoadInit]:
    """INITIALIZE FOR LOAD of the EP, §3.4. Amount 0 reads the online counter and changes
    nothing on the card (recovery probe)."""
    if not 0 <= amount <= 0x7FFFFFFF:
        raise ValueError(f"load amount {amount} out of range")
    if len(terminal) != 6:
        raise ValueError("terminal number must be 6 bytes")
    command = initialize_load_command(key_index, amount, terminal)
    response = yield command
    if response.sw == 0x9403:
        raise TapRefused("no_load_key", f"{command.label}: card has no load key {key_index}")
    data = require(response, command, Party.CARD, length=16)
    init = LoadInit(
        balance=int.from_bytes(data[0:4], "big"),
        counter=int.from_bytes(data[4:6], "big"),
        key_version=data[6],
        algorithm=data[7],
        random=data[8:12],
        mac1=data[12:16],
    )
    if init.algorithm not in (0x00, 0x04):
        raise CardProtocolError(f"{command.label}: unknown algorithm id {init.algorithm:02X}")
    if init.balance > max_balance:
        raise CardProtocolError(
            f"{command.label}: balance {init.balance} above the plausible maximum {max_balance}"
        )
    return init


def credit_for_load(datetime7: bytes, mac2: bytes) -> Step[bytes]:
    """CREDIT FOR LOAD, §3.5: answer the TAC. 9302 raises :class:`Mac2Rejected`."""
    if len(datetime7) != 7 or len(mac2) != 4:
        raise ValueError("CREDIT FOR LOAD needs a 7-byte date/time and a 4-byte MAC2")
    command = credit_load_command(datetime7, mac2)
    response = yield command
    if response.sw == SW_MAC2_WRONG:
        raise Mac2Rejected(command.label, response.sw, "MAC2 wrong, nothing credited")
    return require(response, command, Party.CARD, length=4)


def prove_load(counter_now: int) -> Step[Proof]:
    """GET TRANSACTION PROVE ``80 5A 00 02 02 <counter now>``: MAC2 ‖ TAC of the last load."""
    return get_transaction_prove(LOAD_TYPE, counter_now)


@dataclass(frozen=True, slots=True)
class CpuLoadIntent:
    """The durable payload of a load intent (store column ``product`` = ``cpu``, op ``load``)."""

    family: str
    aid: str
    asn: str
    load_key: str  # the kiosk-chosen idempotency key the host knows this load by
    counter: int  # online counter the load used (INITIALIZE FOR LOAD bytes 4..5)
    amount: int
    balance_before: int
    key_version: int
    algorithm: int
    random: str
    mac1: str
    datetime: str  # 7 bytes BCD, hex: what MAC2 and the TAC cover
    terminal: str

    def to_payload(self) -> dict[str, Any]:
        return to_payload(OP_LOAD, self)

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CpuLoadIntent:
        return from_payload(cls, OP_LOAD, payload)

    @property
    def balance_after(self) -> int:
        return self.balance_before + self.amount


def judge_load(intent: CpuLoadIntent, counter: int, balance: int) -> Decision:
    """Decide a torn load from the online counter and balance a fresh INITIALIZE FOR LOAD
    shows (§6.4: "if it went up by one, get MAC/TAC with 80 5A 00 02")."""
    stored = intent.counter
    if counter == stored:
        return Decision(Verdict.VOID, "online counter unchanged: the credit did not happen")
    if counter != (stored + 1) & 0xFFFF:
        reason = f"online counter {counter} where {stored} or {stored + 1} was expected"
        fault = f"INITIALIZE FOR LOAD: counter went back: {reason}" if counter < stored else ""
        return Decision(Verdict.UNRESOLVED, reason, card_fault=fault)
    if balance != intent.balance_after:
        return Decision(
            Verdict.UNRESOLVED,
            f"credit happened but balance is {balance}, not {intent.balance_after}",
            card_fault=(
                f"INITIALIZE FOR LOAD: balance moved the wrong way ({balance}, "
                f"expected {intent.balance_after})"
            ),
        )
    return Decision(Verdict.FINALIZE, "online counter moved by one and balance by the amount")
