"""The whole pipeline as a user runs it, read back through the queue API and page.

`switchboard run` (embedded broker, SQLite) receives one email over SMTP, one
SMS through the signed Twilio hook and one form post from the same person, and
a hostile HTML email from someone else; the API shows one contact, one owner,
one conversation with three messages; headless Chromium (Debian's, driven by
Selenium and chromium-driver) shows the same and runs none of the hostile HTML.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait
from twilio.request_validator import RequestValidator

from tests import local_http, needs
from tests.e2e.test_run import _env, _stop, _wait_healthy, running

# slow: among the longest scenarios, left to `make test` (not `make test-quick`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "queue-e2e-token"
CONFIG = """
[smtp]
domains = ["example.com"]

[[webhooks]]
name = "contact"
auth = { kind = "hmac-sha256", secret_env = "E2E_SECRET", allow_replay = true }
map = { email = "email", phone = "phone", text = "message", id = "id" }
verified = ["email", "phone"]

[[teams]]
name = "support"
agents = ["alice", "bob"]
"""
HOSTILE = (
    b"From: Mallory <mallory@example.org>\r\nTo: support@example.com\r\n"
    b"Subject: look\r\nMessage-ID: <hostile@example.org>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>hi</p><script>window.top.document.title='PWNED-SCRIPT'</script>"
    b"<img src=x onerror=\"window.top.document.title='PWNED-ONERROR'\">\r\n"
)


@dataclass
class Pipeline:
    base: str
    headers: dict[str, str]

    def get(self, path: str, **params: Any) -> httpx.Response:  # noqa: ANN401
        return local_http.get(f"{self.base}{path}", params=params, headers=self.headers, timeout=10)


def _wait(check: Any, timeout_s: float = 40) -> Any:  # noqa: ANN401
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("queue-e2e")
    (root / "switchboard.toml").write_text(CONFIG)
    env = _env(
        root,
        SWITCHBOARD_CONFIG=str(root / "switchboard.toml"),
        SWITCHBOARD_TWILIO_AUTH_TOKEN="twilio-e2e",
        SWITCHBOARD_API_TOKEN=TOKEN,
        E2E_SECRET="form-secret",
    )
    base = f"http://127.0.0.1:{env['SWITCHBOARD_HTTP_PORT']}"
    with running(env, root) as process:
        _wait_healthy(base, process, within_s=60)
        body = json.dumps(
            {"id": "f-1", "email": "dana@example.org", "phone": "+14155550123", "message": "Hi"}
        ).encode()
        digest = hmac.new(b"form-secret", body, hashlib.sha256).hexdigest()
        form = local_http.post(
            f"{base}/webhooks/contact",
            content=body,
            headers={"content-type": "application/json", "x-signature": digest},
            timeout=30,
        )
        assert form.status_code == 202, form.text
        email = (
            b"From: Dana <dana@example.org>\r\nTo: support@example.com\r\n"
            b"Subject: My order\r\nMessage-ID: <dana-1@example.org>\r\n\r\n"
            b"Where is my order?\r\n"
        )
        with smtplib.SMTP("127.0.0.1", int(env["SWITCHBOARD_SMTP_PORT"]), timeout=30) as smtp:
            smtp.sendmail("dana@example.org", ["support@example.com"], email)
            smtp.sendmail("mallory@example.org", ["support@example.com"], HOSTILE)
        url = f"{base}/webhooks/twilio/sms"
        sms = {"MessageSid": "SM" + "d" * 32, "From": "+14155550123", "To": "+14155550199"}
        sms["Body"] = "Any news?"
        signature = RequestValidator("twilio-e2e").compute_signature(url, sms)
        answer = local_http.post(
            url, data=sms, headers={"x-twilio-signature": signature}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        running_pipeline = Pipeline(base, {"authorization": f"Bearer {TOKEN}"})
        try:
            yield running_pipeline
        finally:
            code, _, stderr = _stop(process)
            assert code == 0, stderr[-3000:]


def test_the_api_shows_one_contact_one_owner_one_conversation_three_messages(
    pipeline: Pipeline,
) -> None:
    def contact() -> dict[str, Any] | None:
        found = pipeline.get("/api/contacts", identity="phone:+14155550123")
        if found.status_code != 200:
            return None
        body: dict[str, Any] = found.json()
        convs = body["conversations"]
        return body if len(convs) == 1 and convs[0]["message_count"] == 3 else None

    dana = _wait(contact)
    assert dana["identities"] == ["email:dana@example.org", "phone:+14155550123"]
    assert dana["owner"] in {"alice", "bob"}
    by_email = pipeline.get("/api/contacts", identity="email:dana@example.org").json()
    assert by_email["id"] == dana["id"]
    (summary,) = dana["conversations"]
    conversation = pipeline.get(f"/api/conversations/{summary['id']}").json()
    assert conversation["owner"] == dana["owner"]
    assert [m["channel"] for m in conversation["messages"]] == ["webhook", "email", "sms"]
    queue = pipeline.get("/api/queue", owner=dana["owner"]).json()
    (item,) = [i for i in queue["items"] if i["contact_id"] == dana["id"]]
    assert item["open_conversations"] == 1
    assert item["channels"] == ["email", "sms", "webhook"]
    assert (
        local_http.get(
            f"{pipeline.base}/api/queue", params={"owner": "alice"}, timeout=30
        ).status_code
        == 401
    )


def _chromium() -> Any:  # noqa: ANN401 - a Selenium WebDriver
    binary, driver = needs.chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver, log_output=subprocess.DEVNULL), options=options)


def test_an_agent_reads_the_thread_in_chromium_and_no_customer_script_runs(
    pipeline: Pipeline,
) -> None:
    dana = _wait(
        lambda: (
            pipeline.get("/api/contacts", identity="phone:+14155550123").json()
            if pipeline.get("/api/contacts", identity="phone:+14155550123").status_code == 200
            and pipeline.get("/api/contacts", identity="email:mallory@example.org").status_code
            == 200
            else None
        )
    )
    mallory = pipeline.get("/api/contacts", identity="email:mallory@example.org").json()
    browser = _chromium()
    try:
        # Control: unprotected, this very payload does set the flag in this browser.
        payload = HOSTILE.split(b"\r\n\r\n", 1)[1].decode()
        browser.get("data:text/html," + quote(payload.replace("window.top.", "window.")))
        WebDriverWait(browser, 10).until(lambda b: b.title.startswith("PWNED"))
        browser.get(f"{pipeline.base}/queue")
        # The admin signs in with the API token as its password (agents use theirs).
        browser.find_element(By.NAME, "name").send_keys("admin")
        browser.find_element(By.NAME, "password").send_keys(TOKEN)
        browser.find_element(By.ID, "sign-in").click()
        wait = WebDriverWait(browser, 15)
        picker = wait.until(expected_conditions.presence_of_element_located((By.ID, "owner")))
        Select(picker).select_by_value(dana["owner"])
        browser.find_element(By.ID, "show").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "queue")))
        rows = browser.find_elements(By.CSS_SELECTOR, "#queue tr.customer")
        links = [r.find_element(By.TAG_NAME, "a").get_attribute("href") for r in rows]
        assert any(dana["id"] in (link or "") for link in links)
        dana_conversation = dana["conversations"][0]["id"]
        browser.get(f"{pipeline.base}/queue/conversations/{dana_conversation}")
        assert browser.find_element(By.ID, "owner").text == dana["owner"]
        channels = [
            e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message .meta .channel")
        ]
        assert channels == ["webhook", "email", "sms"]
        texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message pre.text")]
        assert "Where is my order?" in texts
        assert "Any news?" in texts
        # Mallory's HTML: shown only sanitized, in a sandboxed frame, under a CSP.
        hostile = mallory["conversations"][0]["id"]
        browser.get(f"{pipeline.base}/queue/conversations/{hostile}")
        for details in browser.find_elements(By.TAG_NAME, "details"):
            details.click()  # open the formatted version: the frame renders now
        time.sleep(1.0)  # a real-world gap: the time a hostile script would need to run
        frames = browser.find_elements(By.TAG_NAME, "iframe")
        assert frames, "the HTML part is shown in a frame"
        assert frames[0].get_attribute("sandbox") == ""
        assert "PWNED" not in browser.title
        assert browser.execute_script("return document.title") == "Mallory"
        assert "<script" not in (frames[0].get_attribute("srcdoc") or "")
    finally:
        browser.quit()
