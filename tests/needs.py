"""Debian programs some tests drive as real peers: a skip locally, a failure in CI.

Each skip names the program and the packages to install, in one form, so that
the summary at the end of the run (``conftest.pytest_terminal_summary``) can
list what was skipped and print one ``apt-get install`` line for all of it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

#: program -> the Debian packages that provide it (what .ci/run installs).
PACKAGES = {
    "dovecot": ("dovecot-imapd",),
    "swaks": ("swaks",),
    "docker-compose": ("docker-compose",),
    "chromium": ("chromium", "chromium-driver"),
    "curl": ("curl",),
}
REASON = re.compile(r"needs (?P<program>[\w-]+) \(apt-get install (?P<packages>[\w -]+)\)")


def missing(program: str, why: str = "") -> NoReturn:
    """Skip the test for lack of ``program`` (fail in CI, where .ci/run installs it)."""
    packages = " ".join(PACKAGES[program])
    if os.environ.get("CI"):
        pytest.fail(f"{program} is required in CI (.ci/run installs {packages}){why}")
    pytest.skip(f"needs {program} (apt-get install {packages}){why}")


def program(name: str) -> str:
    """The path of ``name``, or a skip (a failure in CI) naming its package."""
    path = shutil.which(name)
    if path is None:
        missing(name)
    return path


def chromium() -> tuple[str, str]:
    """Debian's Chromium and its WebDriver."""
    binary = shutil.which("chromium")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if binary is None or not Path(driver).exists():
        missing("chromium")
    return binary, driver
