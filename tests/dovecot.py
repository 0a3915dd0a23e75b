"""A real Dovecot IMAP server for tests, as a plain process on loopback.

Debian's dovecot-imapd (`.ci/run` installs it). One user from a passwd file,
a temporary Maildir, a plain IMAP listener and an IMAPS listener with a
self-signed certificate. `doveadm save` delivers mail without IMAP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from switchboard.broker import free_port
from tests.certs import self_signed
from tests.needs import missing

USER = "support@example.com"
PASSWORD = "dovecot-test-password"


def _config(root: Path, imap_port: int, imaps_port: int) -> str:
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


class Dovecot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.config = root / "dovecot.conf"
        self.cert = root / "cert.pem"
        self._process: subprocess.Popen[bytes] | None = None

    def setup(self) -> Dovecot:
        for sub in ("run", "state", "home"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Dovecot's processes run as unprivileged users and must reach these paths.
        for path in (self.root, self.root / "run", self.root / "home"):
            path.chmod(0o777 if path.name == "home" else 0o755)
        self.cert, _ = self_signed(self.root)
        (self.root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        self.config.write_text(_config(self.root, self.imap_port, self.imaps_port))
        return self

    def start(self) -> Dovecot:
        self._process = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its children in a group of their own: see stop()
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (
                    (self.root / "dovecot.log").read_text()
                    if (self.root / "dovecot.log").exists()
                    else ""
                )
                raise RuntimeError(f"dovecot exited: {self._process.stderr.read()!r} {log}")  # type: ignore[union-attr]
            if _accepts(self.imap_port):
                return self
            time.sleep(0.05)
        raise RuntimeError("dovecot did not start")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        # Children (imap, auth) go with the master; make sure both ports are free.
        if self._ports_close(10) or process is None:
            return
        # A child (imap-login, a client's imap session) outlived the master with the
        # listeners it inherited: a restart failed to bind ("Address already in use",
        # CI 2026-12-02). Its group goes (Dovecot runs in a session of its own).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if not self._ports_close(5):
            raise RuntimeError(f"dovecot's ports {self.imap_port}, {self.imaps_port} still answer")

    def _ports_close(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(_accepts(port) for port in (self.imap_port, self.imaps_port)):
                return True
            time.sleep(0.1)
        return False

    def doveadm(self, *args: str, stdin: bytes | None = None) -> str:
        result = subprocess.run(
            ["doveadm", "-c", str(self.config), *args],
            input=stdin,
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {result.stderr.decode()}")
        return result.stdout.decode()

    def deliver(self, raw: bytes, folder: str = "INBOX") -> None:
        self.doveadm("save", "-u", USER, "-m", folder, stdin=raw)

    def set_uidvalidity(self, value: int, folder: str = "INBOX") -> None:
        self.doveadm("mailbox", "update", "-u", USER, "--uid-validity", str(value), folder)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


@contextmanager
def running_dovecot() -> Iterator[Dovecot]:
    """A started Dovecot; skips the test without dovecot-imapd, except in CI, where
    its absence is a failure."""
    if shutil.which("dovecot") is None:
        missing("dovecot")
    if os.geteuid() != 0:
        missing("dovecot", ", run as root (it drops to its own users)")
    # Not under pytest's tmp_path: those directories are 0700, and Dovecot's
    # unprivileged processes must reach the Maildir.
    root = Path(tempfile.mkdtemp(prefix="switchboard-dovecot-"))
    server = Dovecot(root).setup().start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
