"""``cardhost demo`` (and ``cardagent demo``, which runs it) end to end in a subprocess (a
hang bounded by a timeout, no speed assumed): the default bus role and the POS shop counter,
their exit codes and key lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_BOUND_S = 600


def run_demo(
    tmp_path: Path, *role: str, program: str = "clearinghost.cli"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", program, "--log-format", "json", "demo",
         "--data-dir", str(tmp_path / "demo"), *role],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=DEMO_BOUND_S,
        check=False,
    )  # fmt: skip


def test_the_bus_demo_is_the_default_role(tmp_path: Path) -> None:
    """Through ``cardagent demo``, which runs ``cardhost demo`` as its own program."""
    done = run_demo(tmp_path, program="agent.cli")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-4000:]
    assert re.search(r"card 03105170070100000009 blacklisted there \(list version \d+\)", out)
    assert re.search(r"^paid +03105170070100000001 +tunion", out, re.M)
    assert re.search(r"^refused +03105170070100000001 .* double_tap", out, re.M)
    assert re.search(r"^recovered +03105170070100000007 ", out, re.M)
    assert re.search(r"^refused +03105170070100000009 .* blacklisted", out, re.M)
    taps = re.search(
        r"^(\d+) taps: paid (\d+), recovered (\d+), refused (\d+), torn (\d+)", out, re.M
    )
    assert taps is not None, out
    signed = re.search(r"^records: (\d+) signed, chain verified", out, re.M)
    held = re.search(r"^clearing host: (\d+) records received and verified", out, re.M)
    assert signed and held and signed.group(1) == held.group(1), out


def test_the_pos_demo_shows_a_shop_counter_session_and_its_clearing(tmp_path: Path) -> None:
    done = run_demo(tmp_path, "--role", "pos")
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-4000:]
    assert "!! unexpected" not in out
    lines = out.splitlines()

    def line(pattern: str) -> list[str]:
        found = [x for x in lines if re.search(pattern, x)]
        assert found, f"no line matching {pattern!r} in:\n{out}"
        return found

    assert "terminal SHOP-0001 bound to it" in line(r"^clearing host on http://127\.0\.0\.1:")[0]
    assert line(r"cardagent pos serving http://127\.0\.0\.1:\d+ \(a separate process\)")
    assert line(r"GET  /v1/card .* tunion, balance 50\.00, ok")
    first, again = line(r"POST /v1/purchases A1001 .* -> paid .* balance 37\.50  record #1")
    assert first == again  # the same order id twice: the same answer, one debit
    assert line(r"POST /v1/purchases A1002 .* HTTP 422 amount_out_of_range")
    assert line(r"POST /v1/purchases B2001 .* -> refused .* insufficient_balance")
    assert line(r"POST /v1/purchases C3001 .* -> pending +money moved: unknown yet")
    assert line(r"GET  /v1/orders/C3001 +-> pending")
    assert line(r"POST /v1/purchases C3001 .* -> paid .* balance 32\.00  record #2 recovered")
    assert line(r"POST /v1/refunds R-A1001-1 .* -> requested, money moved: no, record #3")
    assert line(r"#3 +refund_request") and line(r"#1 +purchase .* order A1001")
    assert line(r"^\[sync\] the clearing host holds 3 of the terminal's 3 records")
    assert line(r"settlement file signed by the host key: verified")
    assert line(r"merchant M-DEMO-01 .*: 2 purchases 20\.50, fee 2\.25 % 0\.46, net 20\.04")
    assert line(r"apart +credit_owed SHOP-0001/3 2\.50")
    assert line(r"purchases 20\.50 = net 20\.04 \+ fees 0\.46 .*: reconciles")
    assert line(
        r"^    merchant,M-DEMO-01,Demo Noodle House,dining,6222000011112222,2,2050,225,46,0,2004"
    )
