"""The validator's position file (GPS feed / driver console) read by the engine every tap."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.position import POSITION_FILE, PositionFile, write_position
from agent.products.fares import TapPlace
from tests.fake_reader.scenario import demo_profile


def test_profile_default_then_the_feed_then_a_bad_file(tmp_path: Path) -> None:
    profile = dataclasses.replace(demo_profile(), line="0008", station=2)
    position = PositionFile(tmp_path / POSITION_FILE, profile)
    assert position.current() == TapPlace(8, 2, "single", profile.operator_city)
    write_position(tmp_path, 8, 5, "both")
    assert position.current() == TapPlace(8, 5, "both", profile.operator_city)
    (tmp_path / POSITION_FILE).write_text('{"line": 8, "stop": "five"}')
    with capture_logs() as logs:
        assert position.current() is None
    assert logs[0]["event"] == "position_invalid" and "position.stop" in logs[0]["error"]
    (tmp_path / POSITION_FILE).unlink()
    assert position.current() == TapPlace(8, 2, "single", profile.operator_city)


def test_a_new_position_of_the_same_size_within_one_clock_tick_is_read(tmp_path: Path) -> None:
    """Stop 3, then stop 6, written within one tick of the filesystem's clock: the files share
    mtime and size (simulated here by setting the mtime back), and only the inode tells them
    apart. Without it the engine charged the trip to stop 6 as one to stop 3 (the fares demo
    did, on a fast machine)."""
    profile = dataclasses.replace(demo_profile(), line="0009", station=1)
    position = PositionFile(tmp_path / POSITION_FILE, profile)
    write_position(tmp_path, 9, 3, "both")
    assert position.current() == TapPlace(9, 3, "both", profile.operator_city)
    first = os.stat(tmp_path / POSITION_FILE)
    write_position(tmp_path, 9, 6, "both")
    os.utime(tmp_path / POSITION_FILE, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert os.stat(tmp_path / POSITION_FILE).st_size == first.st_size
    assert position.current() == TapPlace(9, 6, "both", profile.operator_city)


@pytest.mark.parametrize(
    ("line", "stop", "role"), [(-1, 1, "both"), (1, 70000, "both"), (1, 1, "x")]
)
def test_the_feeder_cannot_write_a_bad_position(
    tmp_path: Path, line: int, stop: int, role: str
) -> None:
    with pytest.raises(ValueError, match="position"):
        write_position(tmp_path, line, stop, role)
    assert not (tmp_path / POSITION_FILE).exists()
