"""The demo's simulated card field: a reader module with a PSAM, served over TCP, presenting a
scripted stream of cards to whatever agent connects (``python -m tests.fake_reader.demo_field``).

Each card is inserted, left in the field until the agent gives feedback (or a timeout), then
removed. Torn cards leave mid-DEBIT and come back later in the stream, as passengers do when the
validator asks them to tap again; one never comes back.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.crypto import Algorithm
from agent.logs import configure_logging
from tests.fake_reader.faults import CardTorn
from tests.fake_reader.inprocess import CardField
from tests.fake_reader.module_server import ModuleEmulator
from tests.fake_reader.scenario import (
    M1Presentation,
    TearOnDebit,
    demo_keyset,
    m1_demo_cards,
    make_card,
    make_psam,
)

FEEDBACK_TIMEOUT_S = 5.0


BLACKLISTED_CARD = 9
BLACKLISTED_CARD_ID = "0310" + f"51700701{BLACKLISTED_CARD:08d}"  # T-Union serial of card 9


@dataclass
class Presentation:
    card: Any  # a SimulatedCpuCard, a TearOnDebit wrapper or an M1Presentation
    note: str
    linger_s: float = 0.25


def demo_stream(seed: int) -> list[Presentation]:
    """About twenty taps covering every outcome the demo should show."""
    keys = demo_keyset()
    rng = random.Random(seed)
    t1 = make_card("tunion", 1, keys, balance=5000)
    c2 = make_card("cjt166", 2, keys, balance=2000)
    torn_after = make_card("tunion", 7, keys, balance=3000)
    torn_before = make_card("cjt166", 8, keys, balance=1500)
    never = make_card("legacy1001", 14, keys, balance=900)
    stream = [
        Presentation(t1, "T-Union, local"),
        Presentation(t1, "double tap: already paid"),
        Presentation(c2, "CJ/T 166"),
        Presentation(make_card("legacy1001", 3, keys, balance=800), "ADF 1001 city card"),
        Presentation(make_card("tunion", 4, keys, balance=100), "low balance"),
        Presentation(make_card("cjt166", 5, keys, expiry_date="20230101"), "expired"),
        Presentation(make_card("tunion", 6, keys, lock="temporary"), "locked application"),
        Presentation(TearOnDebit(torn_after, "tear_after"), "torn after the card's commit"),
        Presentation(torn_after, "re-presented: recovered, not charged twice"),
        Presentation(TearOnDebit(torn_before, "tear_before"), "torn before the card's commit"),
        Presentation(torn_before, "re-presented: charged once"),
        Presentation(
            make_card("tunion", 11, keys, city_code="2000", interop=False), "not interoperable"
        ),
        Presentation(make_card("tunion", 12, keys, algorithm=Algorithm.SM4), "SM4 keys"),
        Presentation(TearOnDebit(never, "tear_after"), "torn, never comes back"),
    ]
    stream.append(
        Presentation(make_card("tunion", BLACKLISTED_CARD, keys), "blacklisted at the host")
    )
    stream.extend(Presentation(m1, "M1") for m1 in m1_demo_cards())
    families = ("tunion", "cjt166", "legacy1001")
    for number in range(20, 26):
        family = families[rng.randrange(3)]
        stream.append(
            Presentation(make_card(family, number, keys, balance=rng.randrange(300, 9000)), "")  # type: ignore[arg-type]
        )
    return stream


class FieldRunner:
    """Presents cards one at a time to the emulated reader module."""

    def __init__(self, stream: list[Presentation]) -> None:
        self.stream = stream
        self.field = CardField()
        self.feedback = threading.Event()
        self.emulator = ModuleEmulator(
            self.field,
            {1: make_psam(demo_keyset())},
            torn_exc=CardTorn,
            on_feedback=lambda _ok, _text: self.feedback.set(),
        )

    def serve(self) -> int:
        _thread, port = self.emulator.serve_tcp("127.0.0.1", 0)
        return port

    def run(self, done_file: Path | None = None, start_delay_s: float = 0.5) -> None:
        time.sleep(start_delay_s)
        for item in self.stream:
            self.feedback.clear()
            card = item.card.arm() if isinstance(item.card, M1Presentation) else item.card
            self.field.insert(card)
            self.feedback.wait(FEEDBACK_TIMEOUT_S)
            time.sleep(item.linger_s)
            self.field.remove()
            time.sleep(0.3)  # the agent sees the card leave before the next one comes
        if done_file is not None:
            done_file.write_text("done", encoding="ascii")
            time.sleep(5)  # the agent stops on its own; the emulator stays up until then
        self.emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    configure_logging("json", "warning")
    runner = FieldRunner(demo_stream(args.seed))
    port = runner.serve()
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(port), encoding="ascii")
    tmp.replace(args.port_file)
    runner.run(done_file=args.port_file.with_suffix(".done"))


if __name__ == "__main__":
    main()
