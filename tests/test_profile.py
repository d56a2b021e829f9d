"""Firmware profiles: the shipped ones load, and every kind of bad field gets a clear error."""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
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


# --- every numeric field: finite and in range, refused by name (issue 8, item 7) ---------------

# Numeric fields the demo profile leaves at their defaults: (table header, key, a valid value).
OPTIONAL_NUMBERS = (
    ("[reader.framing]", "length_bytes", "2"),
    ("[reader.framing]", "max_payload", "1024"),
    ("[blacklist]", "lock_key_index", "1"),
    ("[sam]", "retry_interval_s", "2.0"),
    ("[[sam.slots]]", "slot", "1"),
    ("[[cpu_purse.applications]]", "ef17_length", "60"),
    ("[[cpu_purse.applications]]", "ef1e_industry", "2"),
    ("[m1_purse]", "issuance_block", "0"),
    ("[m1_purse]", "directory_sector", "0"),
    ("[m1_purse]", "directory_block", "1"),
    ("[m1_purse]", "enable_flag_normal", "2"),
    ("[m1_purse]", "flag_done_aliases", "[0x14]"),
    ("[m1_purse]", "accepted_card_types", "[1]"),
    ("[m1_purse.keys]", "des_p1", "5"),
    ("[m1_purse.keys]", "des_p2", "1"),
)

BAD_NUMBERS = (("nan", "nan"), ("+inf", "+inf"), ("-inf", "-inf"), ("low", "-1"), ("high", "HIGH"))


@dataclass(frozen=True)
class NumericField:
    """One number of a profile file: its dotted name and where it sits in the text."""

    name: str  # dotted, with list positions: "m1_purse.record_sectors[0]"
    line: int  # 0-based line of the key (for an added optional field: of its table header)
    key: str
    position: int | None  # element of a list of numbers
    added: str = ""  # the "key = value" line an optional field is added as
    is_float: bool = False

    def with_value(self, text: str, literal: str | None) -> str:
        """The profile text with this field set to the TOML ``literal`` (``None``: as it is,
        or as added)."""
        lines = text.splitlines()
        if self.added:
            lines.insert(self.line + 1, self.added)
            index = self.line + 1
        else:
            index = self.line
        if literal is not None:
            new = literal
            if self.position is not None:
                items = [hex(v) for v in tomllib.loads(lines[index])[self.key]]
                items[self.position] = literal
                new = f"[{', '.join(items)}]"
            lines[index] = f"{self.key} = {new}"
        return "\n".join(lines) + "\n"


def numeric_fields(text: str) -> list[NumericField]:
    """Every int/float in the profile text (lists of numbers element by element), plus the
    optional numeric fields of :data:`OPTIONAL_NUMBERS`, each added to its table."""
    fields: list[NumericField] = []
    table = ""
    seen_arrays: dict[str, int] = {}
    header_line: dict[str, int] = {}
    lines = text.splitlines()

    def add(name: str, line: int, key: str, value: Any, added: str = "") -> None:
        if isinstance(value, list) and value and all(type(v) is int for v in value):
            fields.extend(
                NumericField(f"{name}[{i}]", line, key, i, added) for i in range(len(value))
            )
        elif type(value) in (int, float):
            fields.append(NumericField(name, line, key, None, added, type(value) is float))

    for number, raw_line in enumerate(lines):
        stripped = raw_line.strip()
        if stripped.startswith("[["):
            array = stripped.strip("[]").strip()
            seen_arrays[array] = seen_arrays.get(array, -1) + 1
            table = f"{array}[{seen_arrays[array]}]"
            header_line.setdefault(stripped.split("#")[0].strip(), number)
        elif stripped.startswith("["):
            table = stripped.split("#")[0].strip().strip("[]").strip()
            header_line.setdefault(f"[{table}]", number)
        elif "=" in stripped and not stripped.startswith("#"):
            ((key, value),) = tomllib.loads(stripped).items()
            add(f"{table}.{key}", number, key, value)
    for header, key, valid in OPTIONAL_NUMBERS:
        if header in header_line:
            line = header_line[header]
        else:  # a table the file does not have: add it at the end
            lines.append(header)
            line = len(lines) - 1
        table = header.strip("[]")
        name = f"{table}[0].{key}" if header.startswith("[[") else f"{table}.{key}"
        value = tomllib.loads(f"{key} = {valid}")[key]
        add(name, line, key, value, added=f"{key} = {valid}")
    return fields


def with_header_tables(text: str) -> str:
    """The text with the tables that :data:`OPTIONAL_NUMBERS` adds at the end."""
    headers = {line.split("#")[0].strip() for line in text.splitlines()}
    missing = dict.fromkeys(h for h, _, _ in OPTIONAL_NUMBERS if h not in headers)
    return text.rstrip("\n") + "\n" + "".join(f"{h}\n" for h in missing)


DEMO_TEXT = with_header_tables(DEMO.read_text(encoding="utf-8"))
DEMO_NUMBERS = numeric_fields(DEMO_TEXT)


def bad_literal(field: NumericField, kind: str, literal: str) -> str:
    if kind == "high":
        return "1e12" if field.is_float else "1000000000000"
    if kind == "low" and field.is_float:
        return "-1.0"
    return literal


def names_field(message: str, dotted: str) -> bool:
    """The message names every part of the dotted field name, in order."""
    at = 0
    for part in dotted.split("."):
        found = message.find(part, at)
        if found < 0:
            return False
        at = found + len(part)
    return True


BAD_FIELD_CASES = [
    pytest.param(f, kind, literal, id=f"{f.name}={kind}")
    for f in DEMO_NUMBERS
    for kind, literal in BAD_NUMBERS
]


def test_numeric_fields_are_enumerated():
    """The enumeration covers the numbers of every section, and each one still loads when set
    to a valid value (the test below changes only the value)."""
    names = {f.name for f in DEMO_NUMBERS}
    for expected in (
        "terminal.double_tap_window_s",
        "terminal.recovery_window_s",
        "terminal.max_balance",
        "fare.flat_fare",
        "reader.baudrate",
        "reader.timeout_s",
        "reader.poll_interval_s",
        "reader.sam_slot",
        "reader.framing.max_payload",
        "qualification.accepted_card_types[4]",
        "test_keys.keys[3].levels",
        "cpu_purse.applications[0].ef17_length",
        "m1_purse.purse_sector",
        "m1_purse.record_sectors[2]",
        "m1_purse.keys.fc_p1",
        "m1_purse.keys.sector_ids.records",
        "m1_purse.tac.p1",
    ):
        assert expected in names
    assert len(DEMO_NUMBERS) > 50
    for f in DEMO_NUMBERS:
        if f.added:
            parse_profile(tomllib.loads(f.with_value(DEMO_TEXT, None)))


@pytest.mark.parametrize(("field", "kind", "literal"), BAD_FIELD_CASES)
def test_every_numeric_field_refuses_nan_inf_and_out_of_range(field, kind, literal):
    """NaN, +inf, -inf and an out-of-range value in any number: refused, naming the field."""
    text = field.with_value(DEMO_TEXT, bad_literal(field, kind, literal))
    with pytest.raises(ConfigurationError) as info:
        parse_profile(tomllib.loads(text), source="bad.toml")
    assert names_field(str(info.value), field.name), str(info.value)
    assert str(info.value).startswith("bad.toml")


def test_m1_layout_and_framing_are_validated_at_load_and_kept_raw():
    """[m1_purse] and [reader.framing] go through their own validators at load (a broken one
    is refused naming the field); a good one stays on the profile as the raw table."""
    raw = raw_demo()
    raw["reader"]["framing"] = {"start": "AA55", "length_bytes": 1, "checksum": "sum8"}
    profile = parse_profile(raw, source="good.toml")
    assert profile.m1_purse == raw["m1_purse"]
    assert profile.reader.framing == raw["reader"]["framing"]
    raw["reader"]["framing"]["checksum"] = "crc32"
    with pytest.raises(ConfigurationError, match=r"good\.toml: reader\.framing\.checksum"):
        parse_profile(raw, source="good.toml")
    raw = raw_demo()
    raw["m1_purse"]["public_sector"] = raw["m1_purse"]["purse_sector"]
    with pytest.raises(ConfigurationError, match=r"m1_purse: field 'public_sector'"):
        parse_profile(raw, source="good.toml")
    raw = raw_demo()
    raw["m1_purse"]["keys"]["provider"] = "guess"
    with pytest.raises(ConfigurationError, match=r"m1_purse\.keys: field 'provider'"):
        parse_profile(raw, source="good.toml")


# --- [sam]: slots and routes (issue 8, item 2) ---------------------------------------------------


def sam_raw(
    slots: list[dict[str, Any]], routes: list[dict[str, Any]], **sam: Any
) -> dict[str, Any]:
    """The demo profile (serial driver, [m1_purse]) with this [sam] section."""
    raw = raw_demo()
    raw["sam"] = {"kind": "psam", "slots": slots, "routes": routes, **sam}
    return raw


TWO_SLOTS = [{"name": "jtt978", "slot": 1}, {"name": "local", "slot": 2}]
TWO_ROUTES = [
    {"families": ["tunion"], "slot": "jtt978", "application": "tunion"},
    {"families": ["cjt166", "legacy1001", "m1"], "slot": "local", "application": "cjt166"},
]


def test_sam_routes_parse():
    profile = parse_profile(sam_raw(TWO_SLOTS, TWO_ROUTES, retry_interval_s=0.5))
    assert [(s.name, s.slot, s.reader) for s in profile.sam_slots] == [
        ("jtt978", 1, ""),
        ("local", 2, ""),
    ]
    assert [(r.families, r.slot, r.application) for r in profile.sam_routes] == [
        (("tunion",), "jtt978", "tunion"),
        (("cjt166", "legacy1001", "m1"), "local", "cjt166"),
    ]
    assert profile.sam_retry_interval_s == 0.5
    assert profile.sam_application == "tunion"  # the first route's preset, for old callers


def test_sam_route_by_aid_and_fid():
    routes = [
        {"families": ["tunion"], "slot": "psam", "aid": "A0000006324D4F542E435053414D3031"},
        {
            "families": ["cjt166", "legacy1001", "m1"],
            "slot": "psam",
            "fid": "1001",
            "aid": "BDA8C9E8B2BF",
        },
    ]
    profile = parse_profile(sam_raw([{"name": "psam"}], routes))
    tunion, cjt = profile.sam_routes
    assert tunion.aid == bytes.fromhex("A0000006324D4F542E435053414D3031") and not tunion.fid
    assert (cjt.fid, cjt.aid) == (bytes.fromhex("1001"), bytes.fromhex("BDA8C9E8B2BF"))
    assert cjt.label == "fid 1001 / aid BDA8C9E8B2BF"
    # A slot without a location sits where [reader] says (serial: reader.sam_slot).
    assert profile.sam_slots[0].slot == 1


def test_old_sam_application_is_one_slot_serving_every_route():
    raw = raw_demo()
    raw["sam"] = {"kind": "psam", "application": "cjt166"}
    raw["reader"]["sam_slot"] = 3
    profile = parse_profile(raw)
    assert profile.sam_application == "cjt166"
    ((slot,),) = (profile.sam_slots,)
    assert (slot.name, slot.slot) == ("psam", 3)
    ((route,),) = (profile.sam_routes,)
    assert set(route.families) == {"tunion", "cjt166", "legacy1001", "m1"}
    assert (route.slot, route.application) == ("psam", "cjt166")


def test_sam_slots_for_pcsc_name_their_readers():
    raw = sam_raw(
        [
            {"name": "jtt978", "reader": "Virtual PCD 00 01"},
            {"name": "local", "reader": "Virtual SAM 00 00"},
        ],
        TWO_ROUTES,
    )
    raw["reader"] = {"driver": "pcsc", "card_reader": "Virtual PCD 00 00"}
    profile = parse_profile(raw)  # no reader.sam_reader needed: every slot names its reader
    assert [s.reader for s in profile.sam_slots] == ["Virtual PCD 00 01", "Virtual SAM 00 00"]
    raw["sam"]["slots"][1] = {"name": "local"}  # this one would sit at reader.sam_reader
    with pytest.raises(ConfigurationError, match=r"reader\.sam_reader"):
        parse_profile(raw)


def _route(families: list[str], slot: str = "jtt978", **app: Any) -> dict[str, Any]:
    return {"families": families, "slot": slot, **(app or {"application": "tunion"})}


BAD_SAM = [
    pytest.param(
        TWO_SLOTS,
        [*TWO_ROUTES[:1], _route(["cjt166", "legacy1001", "m1"], "lokal")],
        r"sam\.routes\[1\]\.slot.*'lokal'",
        id="unknown-slot",
    ),
    pytest.param(
        TWO_SLOTS,
        [*TWO_ROUTES, _route(["tunion"], "local")],
        r"sam\.routes\[2\]\.families.*'tunion' already routed",
        id="family-twice",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "m1"], "local")],
        r"sam\.routes.*'legacy1001'.*cpu_purse\.applications",
        id="cpu-family-unrouted",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "legacy1001"], "local")],
        r"sam\.routes.*'m1'.*m1_purse",
        id="m1-unrouted",
    ),
    pytest.param(
        TWO_SLOTS,
        [*TWO_ROUTES, _route(["metro"], "local")],
        r"sam\.routes\[2\]\.families.*'metro'",
        id="unknown-family",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route([], "local")],
        r"sam\.routes\[1\]\.families",
        id="no-families",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "jtt978", "slot": 2}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.name.*already",
        id="slot-name-twice",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "local", "slot": 1}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.slot.*another slot",
        id="slot-location-twice",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "", "slot": 2}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.name",
        id="empty-slot-name",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "local", "slot": 16}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.slot.*0\.\.15",
        id="slot-number-range",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "local", "slot": float("nan")}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.slot.*integer",
        id="slot-number-nan",
    ),
    pytest.param(
        [TWO_SLOTS[0], {"name": "local", "reader": "X*"}],
        TWO_ROUTES,
        r"sam\.slots\[1\]\.reader.*driver 'serial' needs slot",
        id="reader-on-serial",
    ),
    pytest.param(
        [*TWO_SLOTS, {"name": "spare", "slot": 3}],
        TWO_ROUTES,
        r"sam\.slots\[2\]\.name.*used by no",
        id="unused-slot",
    ),
    pytest.param(
        [{**TWO_SLOTS[0], "readr": "x"}, TWO_SLOTS[1]],
        TWO_ROUTES,
        r"sam\.slots\[0\]\.readr.*unknown",
        id="unknown-slot-key",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], {**TWO_ROUTES[1], "applicaton": "x"}],
        r"sam\.routes\[1\]\.applicaton.*unknown",
        id="unknown-route-key",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "legacy1001", "m1"], "local", application="mot")],
        r"sam\.routes\[1\]\.application.*tunion, cjt166",
        id="unknown-preset",
    ),
    pytest.param(
        TWO_SLOTS,
        [
            TWO_ROUTES[0],
            _route(["cjt166", "legacy1001", "m1"], "local", application="cjt166", fid="1001"),
        ],
        r"sam\.routes\[1\]\.application.*not both",
        id="preset-and-fid",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], {"families": ["cjt166", "legacy1001", "m1"], "slot": "local"}],
        r"sam\.routes\[1\]\.application.*required",
        id="no-application",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "legacy1001", "m1"], "local", fid="10")],
        r"sam\.routes\[1\]\.fid.*2 bytes",
        id="short-fid",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "legacy1001", "m1"], "local", aid="A0XX000632")],
        r"sam\.routes\[1\]\.aid.*hex",
        id="aid-not-hex",
    ),
    pytest.param(
        TWO_SLOTS,
        [TWO_ROUTES[0], _route(["cjt166", "legacy1001", "m1"], "local", aid="A000")],
        r"sam\.routes\[1\]\.aid.*5\.\.16 bytes",
        id="short-aid",
    ),
]


@pytest.mark.parametrize(("slots", "routes", "message"), BAD_SAM)
def test_bad_sam_routing_is_refused_naming_the_field(slots, routes, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        parse_profile(sam_raw(copy.deepcopy(slots), copy.deepcopy(routes)), source="bad.toml")
    assert str(info.value).startswith("bad.toml")


@pytest.mark.parametrize(
    ("sam", "message"),
    [
        (
            {"kind": "psam", "application": "tunion", "slots": TWO_SLOTS, "routes": TWO_ROUTES},
            r"sam\.application.*cannot be combined",
        ),
        ({"kind": "psam", "slots": TWO_SLOTS}, r"sam\.routes.*required"),
        ({"kind": "psam", "routes": TWO_ROUTES}, r"sam\.slots.*required"),
        (
            {"kind": "psam", "routes": TWO_ROUTES, "slots": {"name": "x"}},
            r"sam\.slots.*list of tables",
        ),
        ({"kind": "psam", "application": "mot"}, r"sam\.application.*tunion, cjt166"),
        ({"kind": "psam", "aplication": "tunion"}, r"sam\.aplication.*unknown"),
        (
            {
                "kind": "psam",
                "slots": TWO_SLOTS,
                "routes": TWO_ROUTES,
                "retry_interval_s": float("nan"),
            },
            r"sam\.retry_interval_s.*finite",
        ),
        (
            {
                "kind": "psam",
                "slots": TWO_SLOTS,
                "routes": TWO_ROUTES,
                "retry_interval_s": float("inf"),
            },
            r"sam\.retry_interval_s",
        ),
        (
            {"kind": "psam", "slots": TWO_SLOTS, "routes": TWO_ROUTES, "retry_interval_s": 0},
            r"sam\.retry_interval_s.*0\.01\.\.3600",
        ),
    ],
)
def test_bad_sam_section_is_refused_naming_the_field(sam, message):
    raw = raw_demo()
    raw["sam"] = copy.deepcopy(sam)
    with pytest.raises(ConfigurationError, match=message):
        parse_profile(raw)


# --- [blacklist] expired_policy (issue 9) ---------------------------------------------------


def test_expired_blacklist_policy_is_validated_at_load() -> None:
    """The default keeps the last list with an alarm; an unknown policy, or refuse_issuers
    without issuers, is refused naming the field."""
    assert parse_profile(raw_demo()).blacklist_expired_policy == "keep_and_alarm"
    raw = raw_demo()
    raw.setdefault("blacklist", {})["expired_policy"] = "ignore"
    with pytest.raises(ConfigurationError, match=r"blacklist\.expired_policy"):
        parse_profile(raw)
    raw["blacklist"]["expired_policy"] = "refuse_issuers"
    with pytest.raises(ConfigurationError, match=r"blacklist\.expired_refuse_issuers"):
        parse_profile(raw)
    raw["blacklist"]["expired_refuse_issuers"] = ["1000", "xyz"]
    with pytest.raises(ConfigurationError, match=r"expired_refuse_issuers\[1\]"):
        parse_profile(raw)
    raw["blacklist"]["expired_refuse_issuers"] = ["1000", "0101"]
    profile = parse_profile(raw)
    assert profile.blacklist_expired_policy == "refuse_issuers"
    assert profile.blacklist_expired_refuse_issuers == ("1000", "0101")
