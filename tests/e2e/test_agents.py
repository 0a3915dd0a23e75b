"""Agents as people, the queue of customers and the customer card, in Chromium,
against `switchboard run` (issue 18).

Carol writes an email (SMTP) and a signed SMS (Twilio): two contacts until the
admin merges them, then one customer with two open conversations. Dan writes an
email. Alice and Bob set their passwords with `switchboard agents set-password`
and sign in, each in their own browser (Debian's chromium and chromium-driver,
driven by Selenium). Alice sees only her queue by default; Carol is one row and
one card with both conversations; Bob reassigns her to Alice; a form posted from
another origin is refused; sign-out ends the session. Screenshots of the queue
and of the card are kept (SWITCHBOARD_TEST_ARTIFACTS, else the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from sqlalchemy import select
from twilio.request_validator import RequestValidator

from router.tables import outbox
from switchboard.db import make_engine
from tests import local_http
from tests.e2e.test_queue import _chromium, _wait
from tests.e2e.test_run import SWITCHBOARD, _env, _stop, _wait_healthy, running

pytestmark = pytest.mark.e2e

TOKEN = "agents-e2e-admin-token"
CONFIG = """
[smtp]
domains = ["example.com"]

[[teams]]
name = "support"
agents = ["alice", "bob"]
"""
PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-22"}


def _set_passwords(env: dict[str, str], cwd: Path) -> None:
    for name, password in PASSWORDS.items():
        done = subprocess.run(
            [*SWITCHBOARD, "agents", "set-password", name, "--stdin"],
            input=password + "\n",
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"password of {name} set" in done.stdout


def _sign_in(browser: Any, base: str, name: str) -> None:  # noqa: ANN401 - a WebDriver
    browser.get(f"{base}/queue")
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "password").send_keys(PASSWORDS[name])
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 20).until(
        expected_conditions.text_to_be_present_in_element((By.ID, "me"), name)
    )


def _rows(browser: Any) -> list[str]:  # noqa: ANN401
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#queue tr.customer a.name")]


class _Attacker(BaseHTTPRequestHandler):
    """Another origin's page that posts a form to the queue as soon as it loads."""

    target = ""
    # Chromium opens speculative connections that never send a request; a silent
    # socket must not hold a handler (and the server's shutdown) for a minute.
    timeout = 5

    def do_GET(self) -> None:
        page = (
            "<html><body><form id=f method=post action='" + self.target + "'>"
            "<input name=status value=closed><input name=csrf value=guessed></form>"
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ANN401
        pass


@contextmanager
def _attacker_site(target: str) -> Iterator[str]:
    handler = type("Attacker", (_Attacker,), {"target": target})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join(5)


def _artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SWITCHBOARD_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shot(browser: Any, path: Path, name_id: str, name: str) -> None:  # noqa: ANN401
    """A screenshot that shows the customer's name: the element holding it is on
    the page, visible, inside the captured viewport."""
    element = browser.find_element(By.CSS_SELECTOR, name_id)
    assert element.text == name
    assert element.is_displayed()
    height = browser.execute_script("return window.innerHeight")
    assert 0 <= element.location["y"] < height
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 5000


@pytest.mark.slow
def test_two_agents_work_their_queues_in_chromium(tmp_path: Path) -> None:
    root = tmp_path
    (root / "switchboard.toml").write_text(CONFIG)
    env = _env(
        root,
        SWITCHBOARD_CONFIG=str(root / "switchboard.toml"),
        SWITCHBOARD_TWILIO_AUTH_TOKEN="twilio-e2e",
        SWITCHBOARD_API_TOKEN=TOKEN,
    )
    _set_passwords(env, root)
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    with running(env, root) as process:
        _wait_healthy(base, process, within_s=60)
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.sendmail(
                "carol@example.org",
                ["support@example.com"],
                b"From: Carol Jones <carol@example.org>\r\nTo: support@example.com\r\n"
                b"Subject: Refund for order 1234\r\nMessage-ID: <carol-1@example.org>\r\n\r\n"
                b"Where is my refund?\r\n",
            )
            smtp.sendmail(
                "dan@example.net",
                ["support@example.com"],
                b"From: Dan Brown <dan@example.net>\r\nTo: support@example.com\r\n"
                b"Subject: Password reset\r\nMessage-ID: <dan-1@example.net>\r\n\r\n"
                b"I cannot sign in.\r\n",
            )
        url = f"{base}/webhooks/twilio/sms"
        sms = {"MessageSid": "SM" + "c" * 32, "From": "+14155550123", "To": "+14155550199"}
        sms["Body"] = "Any news about my refund? Carol"
        signature = RequestValidator("twilio-e2e").compute_signature(url, sms)
        assert (
            local_http.post(
                url, data=sms, headers={"x-twilio-signature": signature}, timeout=30
            ).status_code
            == 200
        )

        def contact(identity: str) -> dict[str, Any] | None:
            found = admin.get("/api/contacts", params={"identity": identity})
            return found.json() if found.status_code == 200 else None

        carol = _wait(lambda: contact("email:carol@example.org"))
        carol_sms = _wait(lambda: contact("phone:+14155550123"))
        dan = _wait(lambda: contact("email:dan@example.net"))
        # The admin merges Carol's two contacts (one person), then sets the owners.
        merged = admin.post(
            f"/api/contacts/{carol['id']}/merge", json={"contact_id": carol_sms["id"]}
        )
        assert merged.status_code == 200, merged.text
        for who, owner in ((carol, "bob"), (dan, "alice")):
            moved = admin.post(f"/api/contacts/{who['id']}/owner", json={"owner": owner})
            assert moved.status_code == 200, moved.text
        _wait(lambda: (contact("email:carol@example.org") or {}).get("owner") == "bob")

        alice, bob = _chromium(), _chromium()
        try:
            _sign_in(alice, base, "alice")
            _sign_in(bob, base, "bob")
            # Alice's own queue by default: Dan, not Carol.
            assert Select(alice.find_element(By.ID, "owner")).first_selected_option.text == (
                "My queue (alice)"
            )
            assert _rows(alice) == ["Dan Brown"]
            # Bob's: Carol once, with her two open conversations.
            assert _rows(bob) == ["Carol Jones"]
            row = bob.find_element(By.CSS_SELECTOR, "#queue tr.customer")
            assert row.find_element(By.CSS_SELECTOR, "td.count").text == "2"
            assert "email" in row.text
            assert "sms" in row.text
            shots = _artifacts(tmp_path)
            _shot(bob, shots / "queue.png", "#queue tr.customer a.name", "Carol Jones")
            row.find_element(By.CSS_SELECTOR, "a.name").click()
            WebDriverWait(bob, 20).until(
                expected_conditions.presence_of_element_located((By.ID, "customer-name"))
            )
            assert len(bob.find_elements(By.CSS_SELECTOR, ".conversation-section")) == 2
            assert bob.find_element(By.ID, "several-open").is_displayed()
            identities = bob.find_element(By.ID, "identities").text
            assert "carol@example.org" in identities
            assert "+1 415-555-0123" in identities
            _shot(bob, shots / "card.png", "#customer-name", "Carol Jones")
            # Bob hands Carol to Alice.
            Select(bob.find_element(By.ID, "new-owner")).select_by_value("alice")
            bob.find_element(By.ID, "reassign-button").click()
            # The card is drawn again after the reassignment: ChromeDriver may report the
            # old #owner node as "unknown error: Node ... does not belong to the
            # document" instead of a stale element (failed CI once); looked up again.
            WebDriverWait(
                bob, 20, ignored_exceptions=(StaleElementReferenceException, WebDriverException)
            ).until(expected_conditions.text_to_be_present_in_element((By.ID, "owner"), "alice"))
            alice.get(f"{base}/queue")
            assert sorted(_rows(alice)) == ["Carol Jones", "Dan Brown"]
            # Another site's form, posted with Alice's cookie: refused.
            open_conversation = carol["conversations"][0]["id"]
            target = f"{base}/queue/conversations/{open_conversation}/status"
            with _attacker_site(target) as evil:
                alice.get(evil)
                WebDriverWait(alice, 20).until(
                    lambda b: "cross-origin request refused" in b.page_source
                )
            status = admin.get(f"/api/conversations/{open_conversation}").json()["status"]
            assert status == "open"
            # Sign-out ends the session.
            alice.get(f"{base}/queue")
            alice.find_element(By.ID, "sign-out").click()
            WebDriverWait(alice, 20).until(
                expected_conditions.presence_of_element_located((By.ID, "sign-in"))
            )
            alice.get(f"{base}/queue")
            assert alice.find_elements(By.ID, "sign-in")
            assert not alice.find_elements(By.ID, "me")
        finally:
            alice.quit()
            bob.quit()
        code, _, stderr = _stop(process)
    admin.close()
    assert code == 0, stderr[-3000:]
    # The reassignment is an owner.assigned event (recorded in the router's outbox,
    # then published) that says who did it.
    engine = make_engine(f"sqlite:///{root / 'var' / 'switchboard.db'}")
    try:
        with engine.connect() as c:
            assigned = [
                json.loads(row.data)
                for row in c.execute(select(outbox).order_by(outbox.c.time))
                if "owner.assigned" in row.type
            ]
    finally:
        engine.dispose()
    carols = [
        (e["owner"], e["previous_owner"], e.get("by"))
        for e in assigned
        if e["contact_id"] == carol["id"]
    ]
    assert carols[-1] == ("alice", "bob", "bob")
