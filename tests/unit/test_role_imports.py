"""An edge process loads what its role needs: the router's and the archive's modules
(pyarrow among them) stay out of `ingest http` and `ingest smtp`, of which a host runs
one worker per core, each a fresh interpreter (README "Several processes per port").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "pyarrow",
    "pyarrow.parquet",
    "router.config",
    "router.decide",
    "router.service",
    "router.store",
    "sinks.archive",
    "sinks.archive_buffer",
    "sinks.archive_files",
    "sinks.archive_iceberg",
    "sinks.archive_state",
)

# Builds the role's pipeline as `switchboard ingest <role>` does (nothing connects:
# the broker is not asked until the components start) and lists what it loaded. What
# `run` imports later (migrations, the components' start) is not covered here.
PROGRAM = """
import json, sys
from switchboard.bootstrap import build_pipeline
from switchboard.settings import load_settings
pipeline = build_pipeline(load_settings(), frozenset(sys.argv[1].split(",")))
pipeline.close()
print(json.dumps([m for m in json.loads(sys.argv[2]) if m in sys.modules]))
"""


def loaded(roles: str, tmp_path: Path) -> list[str]:
    # Only this machine's basics: no SWITCHBOARD_* setting of the caller's, and no
    # ./switchboard.toml of its working directory, changes what is built.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")},
        "PYTHONPATH": str(ROOT),
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:9",  # never connected here
        "SWITCHBOARD_LOG_LEVEL": "ERROR",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, roles, json.dumps(HEAVY)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_an_edge_process_loads_no_router_or_archive(tmp_path: Path) -> None:
    # Every edge role in one process: what none of them loads, each alone does not.
    assert loaded("http,smtp,imap", tmp_path) == []


def test_the_check_sees_what_a_role_loads(tmp_path: Path) -> None:
    # The same program for the router and the archive: they are loaded there, so the
    # test above can fail.
    assert set(loaded("router,archive", tmp_path)) == set(HEAVY)
