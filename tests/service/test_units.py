"""The systemd units in contrib/ are complete (sections, enablement) and run commands and
options that exist; `systemd-analyze verify` checks them too where systemd is installed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"


def sections(path: Path) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name, install", [("unpacked-listen.service", "multi-user.target"),
                                           ("unpacked.timer", "timers.target")])
def test_units_can_be_enabled(name, install):
    unit = sections(UNITS / name)
    assert unit["Install"]["WantedBy"] == [install]
    assert unit["Unit"]["Description"]


def test_the_listener_unit_runs_options_that_exist():
    service = sections(UNITS / "unpacked-listen.service")["Service"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[:3] == ["/usr/bin/env", "unpacked", "listen"]
    helped = subprocess.run([sys.executable, "-m", "unpacked", "listen", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0
    for option in (a for a in argv[3:] if a.startswith("--")):
        assert option in helped.stdout, option
    assert "UNPACKED_LISTEN_SECRET_FILE=/etc/unpacked/listen-secret" in service["Environment"]


def test_the_timer_starts_the_cron_job():
    service = sections(UNITS / "unpacked.service")["Service"]
    assert service["Type"] == ["oneshot"] and shlex.split(service["ExecStart"][0])[-1] == "doit"


def test_systemd_accepts_them():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (a container without systemd)")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *map(str, sorted(UNITS.glob("unpacked*")))],
                          capture_output=True, text=True)
    errors = [x for x in done.stderr.splitlines() if "/usr/bin/env" not in x]
    assert not [x for x in errors if "unpacked" in x], done.stderr


@pytest.mark.parametrize("name", ["unpacked.service", "unpacked-listen.service"])
def test_a_stop_never_cuts_a_publish(name):
    service = sections(UNITS / name)["Service"]
    assert service["KillMode"] == ["mixed"], "SIGTERM to the run alone: it stops its workers"
    assert service["TimeoutStopSec"] == ["6h"], "as long as cvmfs_server may publish"
