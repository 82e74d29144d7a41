"""The systemd unit and the notify protocol's pieces."""

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.config import SETTINGS
from jobrunner.systemd import JournalFormatter, Notifier

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "jobrunner.service"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    jobrunner = Path(sys.executable).parent / "jobrunner"
    unit = tmp_path / "jobrunner.service"
    unit.write_text(UNIT.read_text().replace("/opt/jobrunner/venv/bin/jobrunner", str(jobrunner)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "jobrunner.service" in line]
    assert problems == [], problems


def test_the_unit_has_what_the_supervisor_relies_on():
    text = UNIT.read_text()
    # a missing env file must not start a private development database in production
    assert "check-config --production" in text.split("ExecStartPre=")[1].splitlines()[0]
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed", "WatchdogSec=30"):
        assert line in text
    timeout_stop = int(text.split("TimeoutStopSec=")[1].split()[0])
    graceful = float(next(s.default for s in SETTINGS if s.name == "graceful_timeout"))
    assert timeout_stop > graceful


def test_the_example_files_document_every_setting():
    env = (ROOT / "systemd" / "jobrunner.env.example").read_text()
    ini = (ROOT / "systemd" / "jobrunner.ini.example").read_text()
    for setting in SETTINGS:
        # each with its documentation line as config.py has it (" [restart]" may follow)
        assert re.search(rf"^# {re.escape(setting.doc)}( \[restart\])?\n#{setting.env}=", env, re.M), setting.env
        assert setting.secret or re.search(rf"^; {re.escape(setting.doc)}( \[restart\])?\n;{setting.name} = ", ini, re.M), setting.name


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None


def test_journal_lines_carry_their_priority():
    formatter = JournalFormatter("%(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert formatter.format(record) == "<4>two\n<4>lines"
