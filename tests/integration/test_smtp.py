"""The SMTP adapter over real sockets, against the real broker and blob store."""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.policy import SMTPUTF8
from pathlib import Path
from sysconfig import get_paths
from typing import BinaryIO

import pytest

from normalize.content import Serialized
from normalize.email import EmailContext, serialize_email
from normalize.schema import RecipientRole
from switchboard.broker import free_port
from switchboard.settings import KafkaSettings
from tests import needs
from tests.certs import self_signed
from tests.smtp_helpers import collect, queued_id, smtp_server

pytestmark = pytest.mark.integration

CORPUS = sorted((Path(get_paths()["stdlib"]) / "test" / "test_email" / "data").glob("msg_*.txt"))


def email(
    subject: str = "Invoice 1234", body: str = "My invoice is wrong.", **headers: str
) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Example <alice@example.org>"
    msg["To"] = "ACME Support <support@example.com>"
    msg["Subject"] = subject
    msg["Message-ID"] = headers.pop("Message_ID", "<smtp-test@example.org>")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    msg.add_attachment(b"%PDF-1.4 test", maintype="application", subtype="pdf", filename="a.pdf")
    return msg.as_bytes()


def test_mail_for_a_local_domain_is_acknowledged_after_kafka(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    raw = email(Message_ID=f"<{unique}@example.org>")
    with smtp_server(kafka_settings, tmp_path) as server:
        code, reply = server.send(raw, rcpts=("support@example.com", "billing@EXAMPLE.com"))
        assert code == 250
        assert reply.startswith("2.0.0 Ok: queued as ")
        message_id = queued_id(reply)
        inbound, dead = collect(kafka_settings, f"smtp-{unique}", {message_id})
        assert dead == {}
        message = inbound[message_id]
        assert message.sender.value == "alice@example.org"
        assert message.dedupe_key.startswith(f"email-mid:{unique}@example.org#")
        envelope = {r.value for r in message.recipients if r.role is RecipientRole.ENVELOPE}
        assert envelope == {"support@example.com", "billing@example.com"}
        assert message.metadata["helo"] == "client.example.org"
        # The claim checks point at stored bytes: the raw message and the attachment.
        assert message.raw is not None
        # smtplib sends bytes as they are, plus a final CRLF: stored exactly as received.
        assert server.blobs.get(message.raw.sha256) == raw + b"\r\n"
        [pdf] = message.attachments
        assert pdf.blob is not None
        assert server.blobs.get(pdf.blob.sha256) == b"%PDF-1.4 test"


def test_parsing_in_a_worker_process(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    with smtp_server(kafka_settings, tmp_path, parse_workers=1) as server:
        code, reply = server.send(email(Message_ID=f"<worker-{unique}@example.org>"))
    assert code == 250
    inbound, _ = collect(kafka_settings, f"worker-{unique}", {queued_id(reply)})
    [message] = inbound.values()
    assert message.dedupe_key.startswith(f"email-mid:worker-{unique}@example.org#")
    assert len(message.attachments) == 1


def test_a_refusal_in_the_worker_process_keeps_its_reason(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """A NormalizeError raised in the parse process crosses back whole: the dead
    letter says ``no-sender``, not ``normalizer-error``."""
    nobody = f"To: support@example.com\r\nSubject: {unique}\r\n\r\nwho am I?\r\n".encode()
    with smtp_server(kafka_settings, tmp_path, parse_workers=1) as server:
        code, reply = server.send(nobody, mail_from="")
    assert code == 250, reply
    _, dead = collect(kafka_settings, f"nosender-{unique}", {queued_id(reply)})
    [letter] = dead.values()
    assert letter.reason == "no-sender"


def _poisoned_parser(raw: bytes, ctx: EmailContext) -> Serialized:
    """The real parser, except on a marked message: there it dies or hangs (runs in
    the parse process, imported there by name)."""
    if b"X-Poison: crash" in raw:
        os._exit(70)
    if b"X-Poison: hang" in raw:
        time.sleep(3600)
    return serialize_email(raw, ctx)


def test_a_parameter_with_an_open_quote_and_many_semicolons_is_parsed_in_linear_time(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """The standard library splits MIME parameters in quadratic time (CPython
    gh-136063): an attachment's Content-Type of 300,000 ';' after an open quote held
    the parse process past its 60 s timeout, twice, and every mail behind it waited
    two minutes (attacker review of 2026-12-01). normalize.mimeparams splits them in
    linear time in every process that parses; here the real parse process, a 5 s
    timeout, and a mail after it."""
    folded = "\r\n ".join([";" * 900] * 334)
    raw = (
        "From: alice@example.org\r\nTo: support@example.com\r\n"
        f"Message-ID: <semicolons-{unique}@example.org>\r\nSubject: invoice\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f'--b\r\nContent-Type: application/octet-stream; name="a.bin"; y="{folded}\r\n'
        "Content-Disposition: attachment\r\n\r\nAAAA\r\n--b--\r\n"
    ).encode()
    assert len(raw) > 300_000
    _parsed_in_time(kafka_settings, tmp_path, raw, unique, timeout_s=5.0)


def _parsed_in_time(
    kafka_settings: KafkaSettings, tmp_path: Path, raw: bytes, unique: str, timeout_s: float
) -> None:
    """``raw`` through the real parse process with a short timeout: accepted as a
    message, not kept for review (the parse outlasting the timeout twice), and a mail
    after it too."""
    with smtp_server(
        kafka_settings, tmp_path, parse_workers=1, parse_timeout_s=timeout_s
    ) as server:
        code, reply = server.send(raw)
        after = server.send(email(Message_ID=f"<after-{unique}@example.org>"))
    assert code == 250, reply
    assert "kept for review" not in reply, reply
    assert after[0] == 250
    assert "kept for review" not in after[1]


def _tiny_tags(unique: str) -> bytes:
    line = "<b>x</b> word " * 60  # 840 characters: lines within SMTP's 998
    body = "<p>" + "\r\n".join([line] * (4 * 1024 * 1024 // len(line))) + "</p>"
    return (
        "From: alice@example.org\r\nTo: support@example.com\r\n"
        f"Message-ID: <tiny-tags-{unique}@example.org>\r\nSubject: newsletter\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def _encoded_words_subject(unique: str) -> bytes:
    folded = "\r\n ".join(["=?utf-8?q?a?= " * 50] * 2600)  # 130,000 encoded words
    return (
        f"From: eve@example.org\r\nTo: support@example.com\r\nSubject: {folded}\r\n"
        f"Message-ID: <words-{unique}@example.org>\r\n\r\nbody\r\n"
    ).encode()


def _nested_divs(unique: str) -> bytes:
    body = "\r\n".join(["<div>" * 1000] * 130)  # 130,000 elements deep
    return (
        "From: eve@example.org\r\nTo: support@example.com\r\nSubject: divs\r\n"
        f"Message-ID: <divs-{unique}@example.org>\r\nContent-Type: text/html\r\n\r\n"
        f"{body}\r\n"
    ).encode()


def _self_closed_divs(unique: str) -> bytes:
    """The same depth written <div/>, which a depth counted by pattern took for no
    depth at all (review of the first fix, 2026-12-02): 108 s to parse, twice."""
    return _nested_divs(unique).replace(b"<div>", b"<div/>")


@pytest.mark.parametrize(
    "bomb", [_tiny_tags, _encoded_words_subject, _nested_divs, _self_closed_divs]
)
def test_mail_built_to_make_the_parser_crawl_is_parsed_in_linear_time(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, bomb: Callable[[str], bytes]
) -> None:
    """Each held the parse process past its 60 s timeout twice (2026-12-02), and every
    mail behind it waited: 4 MB of <b>x</b> in one <p> (inscriptis merges one block's
    text in quadratic time, 50-58 s; over normalize.email.LAYOUT_HTML_MAX the text is
    taken in linear time now, about 1.4 s for this mail), and two found by that day's
    attacker review: a 1.8 MB Subject of 130,000 encoded words (the standard library
    decodes them in quadratic time; now only the first 16 KiB of a header are
    decoded), and 650 KB of 130,000 nested <div> (the HTML sanitizer is quadratic in
    depth; HTML of more than 10,000 start tags is not rendered now, also written
    <div/>). The real parse process with
    a 10 s timeout: kept for review before, a message now, and the next mail too."""
    _parsed_in_time(kafka_settings, tmp_path, bomb(unique), unique, timeout_s=10.0)


def test_an_attachment_type_longer_than_the_schema_allows_does_not_lose_the_mail(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """An attachment declared as application/vnd.xxx... (265 characters) failed the
    schema's 255 and the whole mail was dead-lettered (review of 2026-12-01)."""
    long_type = "application/vnd." + "x" * 260
    raw = (
        "From: alice@example.org\r\nTo: support@example.com\r\n"
        f"Message-ID: <long-type-{unique}@example.org>\r\nSubject: invoice\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f"--b\r\nContent-Type: {long_type}\r\nContent-Disposition: attachment; "
        'filename="a.bin"\r\n\r\nAAAA\r\n--b--\r\n'
    ).encode()
    with smtp_server(kafka_settings, tmp_path) as server:
        code, reply = server.send(raw)
    assert code == 250, reply
    assert "kept for review" not in reply, reply
    queued = queued_id(reply)
    inbound, dead = collect(kafka_settings, f"long-type-{unique}", {queued})
    assert not dead
    (attachment,) = inbound[queued].attachments
    assert attachment.content_type == long_type[:255]
    assert attachment.filename == "a.bin"


@pytest.mark.parametrize("poison", ["crash", "hang"])
def test_a_message_that_kills_or_hangs_the_parser_costs_only_itself(
    kafka_settings: KafkaSettings,
    tmp_path: Path,
    unique: str,
    poison: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ingest.smtp.serialize_email", _poisoned_parser)
    bad = email(Message_ID=f"<poison-{unique}@example.org>", X_Poison=poison)
    good = [email(Message_ID=f"<fine-{i}-{unique}@example.org>") for i in range(6)]
    with (
        smtp_server(kafka_settings, tmp_path, parse_workers=1, parse_timeout_s=1.0) as server,
        ThreadPoolExecutor(7) as senders,
    ):
        replies = list(senders.map(server.send, [bad, *good]))
        # The server goes on with a fresh parse process.
        after = server.send(email(Message_ID=f"<after-{unique}@example.org>"))
    assert all(code == 250 for code, _ in [*replies, after]), replies
    assert "kept for review: normalizer-error" in replies[0][1]
    ids = {queued_id(reply) for _, reply in [*replies, after]}
    inbound, dead = collect(kafka_settings, f"poison-{poison}-{unique}", ids)
    letter = dead[queued_id(replies[0][1])]
    assert letter.reason == "normalizer-error"
    assert "twice" in letter.detail
    assert letter.raw is not None
    assert b"X-Poison" in server.blobs.get(letter.raw.sha256)
    assert len(inbound) == 7
    assert len(dead) == 1


def test_a_mail_that_would_take_the_parser_s_memory_is_kept_for_review(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """12 MB of header lines (under the size limit) make the standard library's
    parser take 30 times that. With the parse process bounded (256 MiB here, 1 GiB by
    default) that mail is kept raw as a dead letter at once, and the same process
    takes the next mail: the host's memory is not the stranger's to take."""
    bomb = (
        f"From: Mallory <mallory@example.org>\r\nTo: support@example.com\r\n"
        f"Subject: bomb\r\nMessage-ID: <bomb-{unique}@example.org>\r\n".encode()
        + b"X-A: b\r\n" * (12 * 1024 * 1024 // 8)
        + b"\r\nbody\r\n"
    )
    with smtp_server(kafka_settings, tmp_path, parse_workers=1, parse_memory_mb=256) as server:
        bombed = server.send(bomb)
        after = server.send(email(Message_ID=f"<after-bomb-{unique}@example.org>"))
    assert bombed[0] == 250, bombed
    assert "kept for review: normalizer-error" in bombed[1], bombed
    assert after[0] == 250, after
    assert "kept for review" not in after[1], after
    ids = {queued_id(bombed[1]), queued_id(after[1])}
    inbound, dead = collect(kafka_settings, f"bomb-{unique}", ids)
    letter = dead[queued_id(bombed[1])]
    # Out of memory in Python, or (rarely) in the middle of the allocator: a crash,
    # retried on a fresh process, then kept. Either way a dead letter, not a parse.
    assert "256 MB" in letter.detail or "twice" in letter.detail, letter.detail
    assert letter.raw is not None
    assert server.blobs.get(letter.raw.sha256) == bomb
    assert list(inbound) == [queued_id(after[1])]


def test_the_same_email_twice_has_one_dedupe_key(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    raw = email(Message_ID=f"<twice-{unique}@example.org>")
    with smtp_server(kafka_settings, tmp_path) as server:
        first = queued_id(server.send(raw)[1])
        second = queued_id(server.send(raw, rcpts=("sales@example.com",))[1])
    inbound, _ = collect(kafka_settings, f"twice-{unique}", {first, second})
    assert inbound[first].dedupe_key == inbound[second].dedupe_key


def test_never_an_open_relay(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with (
        smtp_server(kafka_settings, tmp_path, addresses=["help@partner.example.net"]) as server,
        server.client() as client,
    ):
        client.ehlo("client.example.org")
        client.mail("spammer@example.org")
        code, text = client.rcpt("victim@elsewhere.example.net")
        assert code == 550
        assert text.decode().startswith("5.1.1")
        assert b"does not relay" in text
        code, _ = client.rcpt("help@partner.example.net")
        assert code == 250
        code, text = client.rcpt("not an address")
        assert code == 553


def test_size_is_advertised_and_enforced(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with smtp_server(kafka_settings, tmp_path, max_message_size=4096) as server:
        with server.client() as client:
            client.ehlo("client.example.org")
            assert client.has_extn("size")
            assert client.esmtp_features["size"] == "4096"
            assert client.has_extn("8bitmime")
            assert client.has_extn("smtputf8")
            code, text = client.mail("alice@example.org", ["SIZE=5000"])
            assert (code, text.decode()[:5]) == (552, "5.3.4")
        with server.client() as client:
            client.ehlo("client.example.org")
            client.mail("alice@example.org")
            client.rcpt("support@example.com")
            code, text = client.data(email(body="x" * 10_000))
            assert (code, text.decode()[:5]) == (552, "5.3.4")


def test_a_large_message_is_accepted_whole(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    video = bytes(range(256)) * (6 * 1024 * 1024 // 256)  # 6 MB, base64 about 8 MB
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "support@example.com"
    msg["Subject"] = "the recording"
    msg["Message-ID"] = f"<big-{unique}@example.org>"
    msg.set_content("Here is the video of the problem.")
    msg.add_attachment(video, maintype="video", subtype="mp4", filename="bug.mp4")
    with smtp_server(kafka_settings, tmp_path) as server:  # default SIZE 25 MB
        # CRLF line endings, as every real client sends them.
        code, reply = server.send(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
        assert code == 250, reply
        inbound, _ = collect(kafka_settings, f"big-{unique}", {queued_id(reply)})
        [message] = inbound.values()
        [attachment] = message.attachments
        assert attachment.size == len(video)
        assert attachment.blob is not None
        assert server.blobs.get(attachment.blob.sha256) == video
        # The event carries references, not the bytes.
        assert len(message.model_dump_json()) < 10_000


def _message_with_dots(unique: str, *, bare: bool = True) -> bytes:
    """A mail whose lines try the DATA reader: dots to unstuff, sentences that end
    with a dot, a bare LF and a bare CR inside lines, a line over 998 octets, and
    base64 lines (no dot in them: one run)."""
    attachment = base64.encodebytes(os.urandom(200_000)).replace(b"\n", b"\r\n")
    return (
        b"From: alice@example.org\r\nTo: support@example.com\r\n"
        + f"Subject: dots {unique}\r\nMessage-ID: <dots-{unique}@example.org>\r\n".encode()
        + b"MIME-Version: 1.0\r\n"
        + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\n"
        + b".starts with a dot\r\nends with a dot.\r\n.\r\n..\r\n...\r\n"
        + (b"bare\nLF and bare\rCR.\r\n" if bare else b"no bare LF or CR.\r\n")
        + b"x" * 2000
        + b".\r\n"
        + b"--b\r\nContent-Type: application/octet-stream\r\n"
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + attachment
        + b"--b--\r\n"
    )


def _stuffed(message: bytes) -> bytes:
    """RFC 5321 section 4.5.2: a dot more before each line that starts with one."""
    return message[:1].replace(b".", b"..") + message[1:].replace(b"\r\n.", b"\r\n..")


def test_data_arrives_byte_exact_in_any_pieces_and_pipelined_quit_is_answered(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """The DATA reader takes runs of lines (ingest/smtpdata.py). Over a real socket,
    sent in pieces that cut CRLFs and the final dot apart, with QUIT pipelined right
    after the dot: the stored raw message is the one sent, unstuffed, and QUIT gets
    its 221 (the reader never reads past the final dot)."""
    message = _message_with_dots(unique)
    dialog = _stuffed(message) + b".\r\nQUIT\r\n"
    ids = []
    with smtp_server(kafka_settings, tmp_path) as server:
        for pieces in (1, 7, 1001):  # whole; 7 bytes at a time; 1001
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                reader = sock.makefile("rb")

                def reply(sock_reader: BinaryIO = reader) -> bytes:
                    lines = [sock_reader.readline()]
                    while lines[-1][3:4] == b"-":
                        lines.append(sock_reader.readline())
                    return b"".join(lines)

                assert reply().startswith(b"220")
                for command in (
                    b"EHLO client.example.org\r\n",
                    b"MAIL FROM:<alice@example.org>\r\n",
                    b"RCPT TO:<support@example.com>\r\n",
                    b"DATA\r\n",
                ):
                    sock.sendall(command)
                    assert reply()[:1] in b"23", command
                size = len(dialog) if pieces == 1 else pieces
                for at in range(0, len(dialog), size):
                    sock.sendall(dialog[at : at + size])
                    if pieces != 1 and at % (size * 50) == 0:
                        time.sleep(0.001)  # let the server read some pieces alone
                done = reply().decode()
                assert done.startswith("250"), done
                assert reply().startswith(b"221")
                ids.append(queued_id(done))
        inbound, _ = collect(kafka_settings, f"dots-{unique}", set(ids))
        assert len(inbound) == len(ids)
        for sent in inbound.values():
            assert sent.raw is not None
            assert server.blobs.get(sent.raw.sha256) == message
            [attachment] = sent.attachments
            assert attachment.size == 200_000


def test_swaks_pipelining_a_message_with_dots(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """The same message through a third-party client, which stuffs the dots itself,
    with its commands pipelined (swaks makes a bare LF a CRLF, and ends the data with
    one more: the message has no bare LF, and the end is compared without it)."""
    needs.program("swaks")
    message = _message_with_dots(unique, bare=False)
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    with smtp_server(kafka_settings, tmp_path) as server:
        reply = _swaks(
            server.port,
            "--pipeline",
            "--from",
            "alice@example.org",
            "--to",
            "support@example.com",
            "--data",
            f"@{path}",
        )
        inbound, _ = collect(kafka_settings, f"swaks-dots-{unique}", {queued_id(reply)})
        [sent] = inbound.values()
        assert sent.raw is not None
        assert server.blobs.get(sent.raw.sha256) in (message, message + b"\r\n")


def test_recipient_limit(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with (
        smtp_server(kafka_settings, tmp_path, max_recipients=2) as server,
        server.client() as client,
    ):
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        assert client.rcpt("a@example.com")[0] == 250
        assert client.rcpt("b@example.com")[0] == 250
        code, text = client.rcpt("c@example.com")
        assert (code, text.decode()[:5]) == (452, "4.5.3")


def test_a_recipient_of_invalid_utf8_is_refused_for_good(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """The 553 quoted the address, whose invalid UTF-8 could not be encoded: the
    client got 451 and retried an address that can never work (attacker review,
    2026-12-02)."""
    with (
        smtp_server(kafka_settings, tmp_path) as server,
        server.client() as client,
    ):
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        client.send(b"RCPT TO:<support\xff\xfe@example.com>\r\n")
        code, text = client.getreply()
        assert code == 553, text
        assert b"support\\udcff\\udcfe@example.com" in text
        client.send(b"RCPT TO:<x@elsewhere.example\xff>\r\n")
        assert client.getreply()[0] in {550, 553}
        assert client.rcpt("support@example.com")[0] == 250  # the session goes on


def test_a_failed_hand_off_answers_451_never_250(tmp_path: Path) -> None:
    nowhere = KafkaSettings(
        bootstrap=f"127.0.0.1:{free_port()}",
        max_block_ms=300,
        request_timeout_ms=500,
        publish_timeout_s=1.0,
    )
    with smtp_server(nowhere, tmp_path) as server:
        code, reply = server.send(email())
    assert code == 451
    assert reply.startswith("4.3.0")


def test_an_unparseable_message_is_kept_and_dead_lettered(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    raw = f"From: nobody\r\nX-Test: {unique}\r\n\r\nthere is no sender here\r\n".encode()
    with smtp_server(kafka_settings, tmp_path) as server:
        code, reply = server.send(raw, mail_from="")
        assert code == 250
        assert "kept for review: no-sender" in reply
        record_id = queued_id(reply)
        inbound, dead = collect(kafka_settings, f"dl-{unique}", {record_id})
        assert inbound == {}
        letter = dead[record_id]
        assert letter.reason == "no-sender"
        assert letter.raw is not None
        assert unique.encode() in server.blobs.get(letter.raw.sha256)


def test_the_stdlib_defect_corpus_through_the_real_server(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    """Every message becomes a valid InboundMessage or a dead letter with a reason."""
    ids = set()
    with smtp_server(kafka_settings, tmp_path) as server:
        for path in CORPUS:
            code, reply = server.send(path.read_bytes())
            assert code == 250, (path.name, code, reply)
            ids.add(queued_id(reply))
    inbound, dead = collect(kafka_settings, f"corpus-{unique}", ids, timeout_s=60)
    assert set(inbound) | set(dead) == ids
    assert all(letter.reason for letter in dead.values())
    assert len(inbound) >= 40  # the envelope sender rescues most From-less messages


def test_smtputf8_addresses(kafka_settings: KafkaSettings, tmp_path: Path, unique: str) -> None:
    msg = EmailMessage()
    msg["From"] = "José <josé@example.org>"
    msg["To"] = "support@example.com"
    msg["Subject"] = "Réclamation"
    msg["Message-ID"] = f"<utf8-{unique}@example.org>"
    msg.set_content("Ça ne marche pas.")
    raw = msg.as_bytes(policy=SMTPUTF8)
    with smtp_server(kafka_settings, tmp_path) as server:
        code, reply = server.send(raw, mail_from="josé@example.org", mail_options=["SMTPUTF8"])
    assert code == 250, reply
    inbound, _ = collect(kafka_settings, f"utf8-{unique}", {queued_id(reply)})
    [message] = inbound.values()
    assert message.sender.value == "josé@example.org"
    assert message.subject == "Réclamation"


def test_session_limit(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    with smtp_server(kafka_settings, tmp_path, max_sessions=1) as server, server.client() as first:
        first.ehlo("one.example.org")
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            server.client()
        assert refused.value.smtp_code == 421


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_starttls(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str, event_loop: str
) -> None:
    """On both loops: aiosmtpd puts asyncio's SSL protocol on the connection with the
    transport's set_protocol(), which uvloop's transports have too. A 6 MB message
    over TLS makes both sides wait for each other's buffers (flow control)."""
    cert, key = self_signed(tmp_path, "mx.test.local")
    video = os.urandom(6 * 1024 * 1024)
    big = EmailMessage()
    big["From"] = "alice@example.org"
    big["To"] = "support@example.com"
    big["Message-ID"] = f"<tls-big-{unique}@example.org>"
    big.set_content("the recording, over TLS")
    big.add_attachment(video, maintype="video", subtype="mp4", filename="bug.mp4")
    with smtp_server(
        kafka_settings,
        tmp_path,
        tls_cert=cert,
        tls_key=key,
        require_tls=True,
        event_loop=event_loop,
    ) as server:
        with server.client() as client:
            client.ehlo("client.example.org")
            assert client.has_extn("starttls")
            code, _ = client.mail("alice@example.org")
            assert code == 530  # TLS required first
        with server.client() as client:
            client.ehlo("client.example.org")
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            client.starttls(context=context)
            client.ehlo("client.example.org")
            client.mail("alice@example.org")
            client.rcpt("support@example.com")
            code, reply = client.data(email(Message_ID=f"<tls-{unique}@example.org>"))
            assert code == 250
            client.mail("alice@example.org")
            client.rcpt("support@example.com")
            code, big_reply = client.data(big.as_bytes(policy=big.policy.clone(linesep="\r\n")))
            assert code == 250, big_reply
        inbound, _ = collect(
            kafka_settings,
            f"tls-{unique}-{event_loop}",
            {queued_id(reply.decode()), queued_id(big_reply.decode())},
        )
        assert [m.metadata["tls"] for m in inbound.values()] == [True, True]
        [attachment] = inbound[queued_id(big_reply.decode())].attachments
        assert attachment.blob is not None
        assert server.blobs.get(attachment.blob.sha256) == video


def _swaks(port: int, *arguments: str) -> str:
    """swaks's "queued as" line, sending to the server on ``port`` as ``arguments`` say."""
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", *arguments],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [reply] = [line for line in result.stdout.splitlines() if "queued as" in line]
    return reply


def test_swaks_as_a_third_party_client(
    kafka_settings: KafkaSettings, tmp_path: Path, unique: str
) -> None:
    needs.program("swaks")
    with smtp_server(kafka_settings, tmp_path) as server:
        reply = _swaks(
            server.port,
            "--helo",
            "swaks.example.org",
            "--from",
            "bob@example.org",
            "--to",
            "support@example.com",
            "--header",
            f"Subject: swaks {unique}",
            "--body",
            "Sent by swaks.",
        )
    inbound, _ = collect(kafka_settings, f"swaks-{unique}", {queued_id(reply)})
    [message] = inbound.values()
    assert message.sender.value == "bob@example.org"
    assert message.subject == f"swaks {unique}"
    assert message.text == "Sent by swaks."
