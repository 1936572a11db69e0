"""benchmarks/ stays importable and its command line says what it accepts.

Running a scenario starts a registry, pinhook and a load client: several seconds on a shared
machine, so no scenario runs here (speed goals live in benchmarks/, never in timed tests).
"""

from __future__ import annotations

import pytest

from benchmarks import run
from benchmarks.scenarios import SCENARIOS


def test_every_scenario_can_be_selected() -> None:
    args = run._arguments(["--quick", "--scenarios", ",".join(SCENARIOS)])

    assert args.names == list(SCENARIOS)
    assert len(SCENARIOS) == 8


def test_unknown_scenario_is_a_usage_error_naming_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run._arguments(["--scenarios", "warm,fastest"])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown scenario ['fastest']" in error
    assert "tag-burst" in error
