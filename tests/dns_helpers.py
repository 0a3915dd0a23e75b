"""A real DNS server on loopback serving the records a test publishes, and DKIM keys
and signatures made by the test: sender authentication without the Internet."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer


@dataclass
class Zone(BaseResolver):  # type: ignore[misc]
    """TXT and A records by name; every other name is NXDOMAIN. Counts queries."""

    txt: dict[str, list[str]] = field(default_factory=dict)
    a: dict[str, list[str]] = field(default_factory=dict)
    queries: int = 0

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        self.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if name not in self.txt and name not in self.a:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype == "TXT":
            for text in self.txt.get(name, []):
                # One record may hold several 255-byte strings (DKIM keys do).
                chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
                reply.add_answer(RR(name, QTYPE.TXT, rdata=TXT(chunks), ttl=300))
        elif qtype == "A":
            for address in self.a.get(name, []):
                reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=300))
        return reply


class RunningDns:
    def __init__(self, zone: Zone, server: DNSServer) -> None:
        self.zone = zone
        self._server = server
        self.port: int = server.server.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Take the server down: queries then fail (port unreachable), as in an outage."""
        if self._server.isAlive():
            self._server.stop()
            self._server.server.server_close()


@contextmanager
def dns_server(zone: Zone) -> Iterator[RunningDns]:
    server = DNSServer(
        zone, address="127.0.0.1", port=0, logger=DNSLogger(log="-request,-reply,-truncated")
    )
    server.start_thread()
    running = RunningDns(zone, server)
    try:
        yield running
    finally:
        running.stop()


@dataclass(frozen=True)
class DkimKey:
    selector: str
    domain: str
    private_pem: bytes
    public_b64: str

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"

    def publish(self, zone: Zone) -> None:
        zone.txt[self.record_name] = [self.record]

    def sign(
        self,
        message: bytes,
        headers: Sequence[bytes] = (b"from", b"to", b"subject"),
        length: bool = False,
    ) -> bytes:
        """``message`` with a DKIM-Signature on top (``length``: with an l= tag)."""
        signature = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            include_headers=list(headers),
            length=length,
        )
        return bytes(signature) + message

    def arc_seal(self, message: bytes, authserv_id: str) -> bytes:
        """Seal as a forwarder would: ``message`` must carry its Authentication-Results."""
        sealed = dkim.arc_sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_pem,
            authserv_id.encode(),
        )
        return b"".join(sealed) + message


_lock = threading.Lock()
_keys: dict[tuple[str, str], DkimKey] = {}


def dkim_key(domain: str, selector: str = "s1") -> DkimKey:
    """A fresh 2048-bit RSA key for ``selector._domainkey.domain`` (cached per name)."""
    with _lock:
        found = _keys.get((domain, selector))
        if found is not None:
            return found
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        key = DkimKey(selector, domain, pem, base64.b64encode(public).decode())
        _keys[(domain, selector)] = key
        return key
