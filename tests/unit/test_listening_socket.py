"""Kept-alive HTTP connections must not wait for delayed ACKs (Nagle off)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from switchboard.broker import free_port
from switchboard.runtime import listening_socket


def test_accepted_connections_have_tcp_nodelay() -> None:
    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_client(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_client, sock=listening_socket("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await asyncio.wait_for(accepted, 5)
        writer.close()
        server.close()
        return result

    assert asyncio.run(scenario()) == 1


def test_free_ports_are_outside_the_range_outgoing_connections_use() -> None:
    # A port from the ephemeral range can be taken by any client socket before the
    # process it was chosen for binds it (seen in the fault suite).
    text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    low, high = (int(v) for v in text.split())
    ports = {free_port() for _ in range(50)}
    assert all(not low <= port <= high for port in ports)
    assert len(ports) > 1  # chosen at random: two test runs rarely pick the same one
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))  # and it does bind
