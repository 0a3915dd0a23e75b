"""Sender authentication on the real SMTP server (issue 17), against a real DNS
server on loopback that serves the keys and policies the tests create.

The From address is verified only on a DMARC pass; a broken signature, a missing
one, a signature of another domain or a dead resolver leave it claimed, and the
mail is accepted (250) and published all the same.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from normalize.schema import InboundMessage
from switchboard.settings import KafkaSettings
from switchboard.topics import INBOUND
from tests.dns_helpers import RunningDns, Zone, dkim_key, dns_server
from tests.dovecot import Dovecot
from tests.http_helpers import find
from tests.imap_helpers import imap_adapter, mailbox
from tests.smtp_helpers import RunningSmtp, collect, queued_id, smtp_server

pytestmark = pytest.mark.integration

CAROL = "carol@customer.example"


@pytest.fixture
def dns() -> Iterator[RunningDns]:
    zone = Zone()
    dkim_key("customer.example").publish(zone)
    dkim_key("other.example").publish(zone)
    dkim_key("list.example", "arc").publish(zone)
    zone.txt["_dmarc.customer.example"] = ["v=DMARC1; p=reject; adkim=r; aspf=r"]
    # SPF lets no one send for customer.example but its own MX (not the test client).
    zone.txt["customer.example"] = ["v=spf1 ip4:192.0.2.25 -all"]
    zone.txt["relay.example"] = ["v=spf1 ip4:127.0.0.1 -all"]
    with dns_server(zone) as running:
        yield running


def mail(unique: str, tag: str, sender: str = CAROL, body: str = "Hello from Carol.") -> bytes:
    return (
        f"From: Carol <{sender}>\r\nTo: support@example.com\r\nSubject: order {tag}\r\n"
        f"Message-ID: <{tag}-{unique}@customer.example>\r\n\r\n{body}\r\n"
    ).encode()


def send(
    smtp: RunningSmtp, raw: bytes, mail_from: str, source: str = "127.0.0.1"
) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("mx.sender.example")
        assert client.mail(mail_from)[0] == 250
        assert client.rcpt("support@example.com")[0] == 250
        code, reply = client.data(raw)
        return code, reply.decode()


def deliver(
    kafka: KafkaSettings,
    tmp_path: Path,
    unique: str,
    dns: RunningDns,
    *sends: tuple[bytes, str],
    source: str = "127.0.0.1",
    **overrides: Any,  # noqa: ANN401 - SmtpSettings fields
) -> list[InboundMessage]:
    """Send each (raw, MAIL FROM) from ``source`` through a verifying SMTP server;
    the published messages, in order."""
    settings: dict[str, Any] = {
        "verify": True,
        "dns_servers": [dns.address],
        "dns_timeout_s": 0.5,
        "verify_timeout_s": 2.0,
        **overrides,
    }
    ids = []
    with smtp_server(kafka, tmp_path, **settings) as smtp:
        for raw, mail_from in sends:
            code, reply = send(smtp, raw, mail_from, source)
            assert code == 250, reply
            ids.append(queued_id(reply))
    inbound, dead = collect(kafka, f"mailauth-{unique}", set(ids))
    assert not dead
    return [inbound[i] for i in ids]


def checks(message: InboundMessage) -> dict[str, tuple[str, str | None]]:
    assert message.authentication is not None
    return {c.method: (c.result, c.domain) for c in message.authentication.checks}


@pytest.mark.slow
@pytest.mark.parametrize("parse_workers", [0, 1])  # the verdict crosses into the worker
def test_a_dmarc_pass_verifies_the_from_address(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns, parse_workers: int
) -> None:
    signed = dkim_key("customer.example").sign(mail(unique, "pass"))
    (message,) = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (signed, "bounce@customer.example"),
        parse_workers=parse_workers,
    )
    assert message.sender.key == f"email:{CAROL}"
    assert message.sender.assurance == "verified"
    assert message.sender.evidence == "dmarc=pass header.from=customer.example"
    assert message.authentication is not None
    assert message.authentication.source == "local"
    found = checks(message)
    assert found["dkim"] == ("pass", "customer.example")
    assert found["dmarc"] == ("pass", "customer.example")
    assert found["spf"] == ("fail", "customer.example")  # 127.0.0.1 is not its MX


def test_broken_missing_or_foreign_signatures_leave_the_sender_claimed(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns
) -> None:
    key = dkim_key("customer.example")
    changed = key.sign(mail(unique, "changed")).replace(b"Hello from Carol.", b"Pay IBAN XX00.")
    unsigned = mail(unique, "unsigned")
    # Validly signed, but by another domain: DMARC wants the From domain's signature.
    foreign = dkim_key("other.example").sign(mail(unique, "foreign"))
    # Signed with l= (body length): the text appended after the signed part is not Carol's.
    appended = key.sign(mail(unique, "appended"), length=True) + b"Pay IBAN XX00.\r\n"
    messages = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (changed, "attacker@evil.example"),
        (unsigned, "attacker@evil.example"),
        (foreign, "attacker@other.example"),
        (appended, "attacker@evil.example"),
    )
    for message in messages:
        assert message.sender.key == f"email:{CAROL}"
        assert message.sender.assurance == "claimed"
        assert message.sender.evidence is None
    changed_checks, unsigned_checks, foreign_checks, appended_checks = (checks(m) for m in messages)
    assert changed_checks["dkim"] == ("fail", "customer.example")
    assert changed_checks["dmarc"] == ("fail", "customer.example")
    assert unsigned_checks["dkim"] == ("none", None)
    assert unsigned_checks["dmarc"] == ("fail", "customer.example")
    assert foreign_checks["dkim"] == ("pass", "other.example")
    assert foreign_checks["dmarc"] == ("fail", "customer.example")
    assert appended_checks["dkim"] == ("policy", "customer.example")
    assert appended_checks["dmarc"] == ("fail", "customer.example")
    assert messages[3].text is not None
    assert "Pay IBAN" in messages[3].text


def _forwarded(unique: str, tag: str) -> bytes:
    """Carol's signed mail, as a mailing list forwards it: checked, footer added, sealed."""
    signed = dkim_key("customer.example").sign(mail(unique, tag))
    footer = signed.replace(b"Hello from Carol.\r\n", b"Hello from Carol.\r\n--\r\nthe list\r\n")
    checked = (
        b"Authentication-Results: list.example; dkim=pass header.d=customer.example; "
        b"dmarc=pass header.from=customer.example\r\n" + footer
    )
    return dkim_key("list.example", "arc").arc_seal(checked, "list.example")


def test_an_arc_seal_of_a_trusted_forwarder_vouches_for_a_broken_signature(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns
) -> None:
    (trusted,) = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (_forwarded(unique, "arc-trusted"), "list-bounces@relay.example"),
        trusted_arc_sealers=["list.example"],
    )
    found = checks(trusted)
    assert found["dkim"] == ("fail", "customer.example")  # the footer broke it
    assert found["arc"] == ("pass", "list.example")
    assert found["dmarc"][0] == "fail"
    assert trusted.sender.assurance == "verified"
    assert trusted.sender.evidence == (
        "arc=pass sealer=list.example dmarc=pass header.from=customer.example"
    )
    # The same chain, from a sealer nobody listed, is only recorded.
    (other,) = deliver(
        kafka_settings,
        tmp_path / "2",
        unique + "b",
        dns,
        (_forwarded(unique, "arc-untrusted"), "list-bounces@relay.example"),
    )
    assert checks(other)["arc"] == ("pass", "list.example")
    assert other.sender.assurance == "claimed"


def test_dns_down_is_temperror_the_mail_is_still_accepted_and_claimed(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns
) -> None:
    signed = dkim_key("customer.example").sign(mail(unique, "dns-down"))
    labels = {"source": "local", "dmarc": "temperror"}
    before = REGISTRY.get_sample_value("switchboard_sender_checks_total", labels) or 0.0
    dns.stop()
    (message,) = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (signed, "bounce@customer.example"),
        dns_timeout_s=0.2,
        verify_timeout_s=0.6,
    )
    found = checks(message)
    assert found["dkim"][0] == "temperror"
    assert found["dmarc"][0] == "temperror"
    assert message.sender.assurance == "claimed"
    assert REGISTRY.get_sample_value("switchboard_sender_checks_total", labels) == before + 1


def _judged(unique: str, tag: str, *results: str) -> bytes:
    """Unsigned mail carrying Authentication-Results headers, topmost first."""
    headers = "".join(f"Authentication-Results: {r}\r\n" for r in results)
    return headers.encode() + mail(unique, tag)


UPSTREAM_PASS = "mx.upstream.example; spf=pass smtp.mailfrom=customer.example; dmarc=pass (p=reject) header.from=customer.example"  # noqa: E501
RELAY = {"trusted_authserv_ids": ["mx.upstream.example"], "trusted_relays": ["127.0.0.2/32"]}


def test_a_trusted_relays_authentication_results_judge_the_sender(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns
) -> None:
    # An upstream MX (rspamd, OpenDMARC) checked DMARC and relays from 127.0.0.2.
    passed, foreign_id, forged_lower, unreadable_top = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (_judged(unique, "relayed", UPSTREAM_PASS), "bounce@customer.example"),
        # A header from an authserv-id nobody listed is someone else's opinion.
        (
            _judged(unique, "foreign-id", "evil.example; dmarc=pass header.from=customer.example"),
            "bounce@customer.example",
        ),
        # Only the topmost trusted header counts: the pass below it came with the mail.
        (
            _judged(
                unique,
                "forged-lower",
                "mx.upstream.example; dmarc=fail header.from=customer.example",
                UPSTREAM_PASS,
            ),
            "attacker@evil.example",
        ),
        # The topmost trusted header does not parse: no verdict, not the forged one below.
        (
            _judged(
                unique,
                "unreadable-top",
                "mx.upstream.example; dmarc=fail header.from=customer.example; dkim=",
                UPSTREAM_PASS,
            ),
            "attacker@evil.example",
        ),
        source="127.0.0.2",
        verify=False,
        **RELAY,
    )
    assert passed.authentication is not None
    assert passed.authentication.source == "authserv:mx.upstream.example"
    assert checks(passed)["dmarc"] == ("pass", "customer.example")
    assert passed.sender.assurance == "verified"
    assert passed.sender.evidence == (
        "authserv:mx.upstream.example dmarc=pass header.from=customer.example"
    )
    assert foreign_id.authentication is None  # verify = false: no local checks either
    assert foreign_id.sender.assurance == "claimed"
    assert forged_lower.authentication is not None
    assert checks(forged_lower)["dmarc"] == ("fail", "customer.example")
    assert forged_lower.sender.assurance == "claimed"
    assert unreadable_top.authentication is None
    assert unreadable_top.sender.assurance == "claimed"


def test_a_trusted_header_from_any_other_client_is_ignored(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, dns: RunningDns
) -> None:
    # Anyone can write "Authentication-Results: mx.upstream.example; dmarc=pass": from a
    # client that is not a trusted relay the local checks judge instead.
    (message,) = deliver(
        kafka_settings,
        tmp_path,
        unique,
        dns,
        (_judged(unique, "direct", UPSTREAM_PASS), "attacker@evil.example"),
        source="127.0.0.1",
        **RELAY,
    )
    assert message.authentication is not None
    assert message.authentication.source == "local"
    assert checks(message)["dmarc"] == ("fail", "customer.example")
    assert message.sender.assurance == "claimed"


def test_imap_mail_is_judged_by_the_mailbox_providers_topmost_header(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    dovecot: Dovecot,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    google = "mx.google.com; dkim=pass header.i=@customer.example; spf=pass smtp.mailfrom=customer.example; dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=customer.example"  # noqa: E501
    dovecot.deliver(_judged(unique, "gmail-pass", google))
    dovecot.deliver(
        _judged(unique, "gmail-foreign", "evil.example; dmarc=pass header.from=customer.example")
    )
    dovecot.deliver(
        _judged(
            unique, "gmail-forged", "mx.google.com; dmarc=fail header.from=customer.example", google
        )
    )
    box = mailbox(
        dovecot, f"auth{unique}", monkeypatch.setenv, trusted_authserv_ids=["mx.google.com"]
    )
    with imap_adapter(kafka_settings, tmp_path, [box]):
        messages = find(
            kafka_settings,
            f"imap-auth-{unique}",
            INBOUND,
            InboundMessage,
            lambda m: m.metadata.get("mailbox") == box.name,
            count=3,
        )
    got = {m.subject: m for m in messages}
    passed = got["order gmail-pass"]
    assert passed.sender.assurance == "verified"
    assert (
        passed.sender.evidence == "authserv:mx.google.com dmarc=pass header.from=customer.example"
    )
    assert passed.authentication is not None
    assert passed.authentication.source == "authserv:mx.google.com"
    assert ("dkim", "pass", "customer.example") in {
        (c.method, c.result, c.domain) for c in passed.authentication.checks
    }
    assert got["order gmail-foreign"].authentication is None
    assert got["order gmail-foreign"].sender.assurance == "claimed"
    forged = got["order gmail-forged"]
    assert checks(forged)["dmarc"] == ("fail", "customer.example")
    assert forged.sender.assurance == "claimed"
