"""Kept-alive HTTP connections must not wait for delayed ACKs (Nagle off)."""

from __future__ import annotations

import asyncio
import socket

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
