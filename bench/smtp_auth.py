"""What sender authentication costs per SMTP message, with the DNS cache warm.

Usage: PYTHONPATH=. .venv/bin/python bench/smtp_auth.py [--messages N]

A DNS server on loopback (dnslib, as in the tests) serves a DKIM key, SPF and a
DMARC policy; every message is DKIM-signed (2048-bit RSA, about 2 KB of text).
Two measurements in one run:
  checks   Verifier.verify() alone: SPF + DKIM + DMARC per message, after one
           warm-up pass, so every DNS answer comes from the cache (DNS queries
           during the measured pass are counted to show it)
  smtp     the real SMTP adapter on the embedded broker, one client sending the
           messages one after the other, verify off and then on: time from the
           end of DATA to the 250 (normalize, blobs, publish with acks=all)
"""

from __future__ import annotations

import argparse
import smtplib
import statistics
import tempfile
import time
from pathlib import Path

from ingest.mailauth import Envelope, Resolver, Verifier
from switchboard.broker import EmbeddedBroker
from switchboard.settings import KafkaSettings
from switchboard.topics import ensure_topics
from tests.dns_helpers import Zone, dkim_key, dns_server
from tests.smtp_helpers import smtp_server

TEXT = ("Hello, my order 4711 has not arrived yet and the tracking page says nothing. " * 26)[:2000]


def corpus(n: int) -> list[bytes]:
    key = dkim_key("customer.example")
    return [
        key.sign(
            f"From: Carol <carol@customer.example>\r\nTo: support@example.com\r\n"
            f"Subject: order {i}\r\nMessage-ID: <bench-{i}-{time.time_ns()}@customer.example>\r\n"
            f"\r\n{TEXT}\r\n".encode()
        )
        for i in range(n)
    ]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def checks(messages: list[bytes], address: str, zone: Zone) -> None:
    verifier = Verifier(Resolver([address], 2.0, 10000), 5.0)
    envelope = Envelope("127.0.0.1", "mx.customer.example", "bounce@customer.example")
    for raw in messages[:10]:  # warm the cache
        verifier.verify(raw, envelope)
    before = zone.queries
    times = []
    for raw in messages:
        started = time.perf_counter()
        verdict = verifier.verify(raw, envelope)
        times.append(time.perf_counter() - started)
        if verdict.dmarc_domain != "customer.example":
            raise SystemExit(f"expected a DMARC pass, got {verdict}")
    print(
        f"checks   {len(messages)} msgs  mean {statistics.mean(times) * 1e3:.2f} ms  "
        f"p50 {pct(times, 0.5) * 1e3:.2f} ms  p99 {pct(times, 0.99) * 1e3:.2f} ms  "
        f"DNS queries while measuring: {zone.queries - before}"
    )


def smtp(
    messages: list[bytes], address: str, kafka: KafkaSettings, zone: Zone, verify: bool
) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        smtp_server(
            kafka, Path(tmp), verify=verify, dns_servers=[address], parse_workers=1
        ) as server,
    ):
        times = []
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            client.ehlo("mx.customer.example")
            for raw in messages[:10]:  # warm up workers, cache, producer
                client.sendmail("bounce@customer.example", ["support@example.com"], raw)
            before = zone.queries
            for raw in messages:
                client.mail("bounce@customer.example")
                client.rcpt("support@example.com")
                client.putcmd("data")
                client.getreply()
                client.send(raw.replace(b"\r\n.", b"\r\n..") + b"\r\n.\r\n")
                started = time.perf_counter()
                code, _ = client.getreply()
                times.append(time.perf_counter() - started)
                if code != 250:
                    raise SystemExit(f"DATA answered {code}")
    label = "smtp on " if verify else "smtp off"
    print(
        f"{label} {len(messages)} msgs  mean {statistics.mean(times) * 1e3:.2f} ms  "
        f"p50 {pct(times, 0.5) * 1e3:.2f} ms  p99 {pct(times, 0.99) * 1e3:.2f} ms  "
        f"({len(times) / sum(times):.0f} msg/s sequential)  DNS queries: {zone.queries - before}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    zone = Zone()
    dkim_key("customer.example").publish(zone)
    zone.txt["customer.example"] = ["v=spf1 ip4:127.0.0.1 -all"]
    zone.txt["_dmarc.customer.example"] = ["v=DMARC1; p=reject"]
    messages = corpus(args.messages)
    with dns_server(zone) as dns:
        checks(messages, dns.address, zone)
        with EmbeddedBroker() as broker:
            kafka = KafkaSettings(bootstrap=broker.bootstrap, partitions=3)
            ensure_topics(kafka)
            smtp(messages, dns.address, kafka, zone, verify=False)
            smtp(messages, dns.address, kafka, zone, verify=True)


if __name__ == "__main__":
    main()
