"""Firmware profiles: the shipped ones load, and every kind of bad field gets a clear error."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigurationError
from agent.profile import Family, Flow, ProfileKind, load_profile, parse_profile

PROFILES = Path(__file__).resolve().parent.parent / "firmware_profiles"
DEMO = PROFILES / "test-city-demo.toml"


def raw_demo() -> dict[str, Any]:
    return tomllib.loads(DEMO.read_text(encoding="utf-8"))


def test_shipped_profiles_load():
    """Every profile in firmware_profiles/ validates."""
    for path in PROFILES.glob("*.toml"):
        profile = load_profile(path)
        assert profile.applications


def test_demo_profile_contents():
    """The demo profile is a test profile with the three card families."""
    profile = load_profile(DEMO)
    assert profile.kind is ProfileKind.TEST
    assert [a.family for a in profile.applications] == [
        Family.TUNION,
        Family.CJT166,
        Family.LEGACY_1001,
    ]
    assert profile.applications[0].flow is Flow.COMPOUND
    assert profile.test_keys


def test_production_profile_carries_no_keys_and_no_software_sam():
    """Production profiles refuse test keys and the software SAM."""
    raw = raw_demo()
    raw["profile"]["kind"] = "production"
    with pytest.raises(ConfigurationError, match="must not carry test_keys"):
        parse_profile(raw)
    del raw["test_keys"]
    raw["sam"]["kind"] = "software"
    with pytest.raises(ConfigurationError, match="software' is refused by production"):
        parse_profile(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("fare", "flat_fare"), -1, "fare.flat_fare' must be in"),
        (("fare", "flat_fare"), "2", "fare.flat_fare' must be an integer"),
        (("terminal", "line"), "12", "terminal.line' must be 4 decimal digits"),
        (("reader", "driver"), "usb", "reader.driver' must be one of"),
        (("profile", "kind"), "staging", "profile.kind' must be one of"),
        (
            ("qualification", "issuer_allow_list"),
            ["XYZ"],
            "issuer_allow_list\\[0\\]' must be an even-length hex",
        ),
        (("crypto", "sm4_session_key"), "guess", "crypto.sm4_session_key' must be one of"),
    ],
)
def test_bad_fields_are_named(path, value, message):
    """A bad value names the field and what was wrong."""
    raw = copy.deepcopy(raw_demo())
    raw[path[0]][path[1]] = value
    with pytest.raises(ConfigurationError, match=message):
        parse_profile(raw, source="bad.toml")


def test_missing_field_and_corrupt_file(tmp_path):
    """A missing field and an unparsable file are configuration errors naming the file."""
    raw = raw_demo()
    del raw["fare"]
    with pytest.raises(ConfigurationError, match=r"missing field 'fare\.flat_fare'"):
        parse_profile(raw)
    bad = tmp_path / "corrupt.toml"
    bad.write_bytes(b"[profile\nname = ")
    with pytest.raises(ConfigurationError, match=r"corrupt\.toml: unreadable"):
        load_profile(bad)
    with pytest.raises(ConfigurationError, match="file not found"):
        load_profile(tmp_path / "absent.toml")


def test_compound_flow_needs_capp_file():
    """ADF 1001 cards have no CAPP file, so a compound flow for them is refused."""
    raw = raw_demo()
    raw["cpu_purse"]["applications"][2]["flow"] = "compound"
    with pytest.raises(ConfigurationError, match="ADF 1001 has none"):
        parse_profile(raw)
