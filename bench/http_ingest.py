"""HTTP ingest throughput: Twilio SMS, JSON web hooks, Mailgun vs a bare FastAPI hook.

Usage: .venv/bin/python bench/http_ingest.py [--seconds S] [--concurrency 1,16,64] [--fresh N]
                                            [--workers 1,2] [--skip-mailgun] [--rounds R]
Needs `wrk` (apt-get install wrk) as the load generator.

Each target runs in its own process on loopback and is driven by wrk with a
fixed request at each concurrency (one wrk thread; the machine has 2 cores):
  bare        FastAPI + uvicorn, POST returns 200 (the design's ceiling), on the
              HTTP parser Switchboard runs on (httptools, a dependency)
  bare-h11    the same on uvicorn's pure-Python h11 parser (the ceiling of the
              figures before httptools became a dependency, 2026-11-29)
  twilio      switchboard run, POST /webhooks/twilio/sms, form signed with the
              real RequestValidator (the same MessageSid each time: a Twilio
              retry, which ingest accepts and the router will deduplicate)
  json-hook   switchboard run, POST /webhooks/bench, HMAC-SHA256 signed JSON
  mailgun     switchboard run, POST /webhooks/mailgun, a signed parsed route
              (rebuilt into MIME and normalized like SMTP mail)
The switchboard targets answer only after the Kafka acknowledgement.

With ``--fresh`` every request is a new message (its own MessageSid, hook id and
text, signed ahead of the run and replayed by wrk's Lua from a file): each one is
a new raw payload blob, written and fsynced before the answer, as real traffic
is. Without it the same request repeats and its blob already exists, so no blob
is written (the figures before 2026-11-29 night). The bare hooks get the same
requests.

With ``--workers 1,2`` the switchboard targets are `switchboard ingest http
--workers N` instead (the edge alone, N processes on one port, its embedded
broker beside it), once per N: what more processes give on this machine, where
wrk shares the two cores with them.

With ``--rounds R`` the whole sequence (the bare hooks, then each target) runs R
times in turn, and each ratio is printed per round (against that round's bare
hook) and as the median of the rounds. This machine's speed drifts between runs
(a bare hook measured 8,482 and then 11,967 req/s a minute apart, 2026-12-02):
a ratio is only meaningful against a ceiling measured right beside it, and one
round is one sample of it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from bench.machine import describe
from switchboard.broker import free_port, wait_for_port

BARE = """
import sys, uvicorn
from fastapi import FastAPI, Response
app = FastAPI()
@app.post("/hook")
async def hook() -> Response:
    return Response(status_code=200)
uvicorn.run(
    app, host="127.0.0.1", port=int(sys.argv[1]), http=sys.argv[2], log_level="warning",
    access_log=False,
)
"""
LUA = """
wrk.method = "POST"
wrk.body = {body}
{headers}
"""
TOKEN = "bench-twilio-token"
SECRET = "bench-hook-secret"


#: The bench's signed JSON hook (replays allowed: the same body every time).
HOOK_CONFIG = (
    '[[webhooks]]\nname = "bench"\n'
    'auth = { kind = "hmac-sha256", secret_env = "BENCH_SECRET", header = "X-Signature", '
    "allow_replay = true }\n"
    'map = { email = "contact.email", phone = "contact.phone", '
    'text = "message", id = "id" }\nverified = ["email", "phone"]\n'
    "rate_per_s = 1000000\nburst = 1000000\n"
)

Request = tuple[str, bytes, dict[str, str]]
#: A request for the n-th message of a run (``--fresh``): url, body, headers.
Fresh = Callable[[str], Request]

#: wrk's script for ``--fresh``: one prepared request per line of a file
#: (header value, tab, body), formatted once in init and sent in turn.
FRESH_LUA = """
local reqs = {{}}
local i = 0
init = function(args)
  for line in io.lines({path}) do
    local tab = line:find("\\t", 1, true)
    reqs[#reqs + 1] = wrk.format("POST", nil, {{
      ["Content-Type"] = {content_type}, [{header}] = line:sub(1, tab - 1)
    }}, line:sub(tab + 1))
  end
end
request = function()
  i = i + 1
  if i > #reqs then i = 1 end
  return reqs[i]
end
"""


def twilio_request(port: int, n: str | None = None) -> Request:
    """A signed Twilio SMS webhook: with ``n``, message ``n`` of a run, a new
    MessageSid and text; without, the same MessageSid each time (a Twilio retry)."""
    url = f"http://127.0.0.1:{port}/webhooks/twilio/sms"
    sid = "SM" + (hashlib.sha256(n.encode()).hexdigest()[:32] if n else "b" * 32)
    form = {
        "MessageSid": sid,
        "AccountSid": "AC" + "1" * 32,
        "From": "+14155550100",
        "To": "+14155550199",
        "Body": "Where is my order? " * 5 + (n or ""),
        "NumMedia": "0",
    }
    signature = RequestValidator(TOKEN).compute_signature(url, form)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature,
    }
    return url, urlencode(form).encode(), headers


def json_hook_request(port: int, n: str | None = None) -> Request:
    """A post to the HOOK_CONFIG hook, HMAC-SHA256 signed (with ``n``: message ``n``
    of a run, its own id and text)."""
    body = json.dumps(
        {
            "id": f"bench-{n or 1}",
            "contact": {"email": "ann@example.com", "phone": "+14155550100"},
            "message": "Call me back " * 10 + (n or ""),
        }
    ).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return (
        f"http://127.0.0.1:{port}/webhooks/bench",
        body,
        {"Content-Type": "application/json", "X-Signature": digest},
    )


def fresh_script(make: Callable[[str], Request], count: int, run: str) -> tuple[str, str]:
    """wrk's Lua for ``count`` new messages made by ``make`` (``run`` keeps them apart
    from every other run's), and the file it reads: returns (script, file)."""
    _, _, headers = make(f"{run}-0")
    header = next(k for k in headers if k != "Content-Type")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as lines:
        for i in range(count):
            _, body, signed = make(f"{run}-{i}")
            lines.write(f"{signed[header]}\t{body.decode()}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            FRESH_LUA.format(
                path=json.dumps(lines.name),
                content_type=json.dumps(headers["Content-Type"]),
                header=json.dumps(header),
            )
        )
    return script.name, lines.name


def wait_http(port: int) -> None:
    if not wait_for_port("127.0.0.1", port, 30):
        raise SystemExit(f"nothing listening on {port}")


def wrk(
    url: str, request: Request | str, seconds: int, conns: int
) -> tuple[float, float, float, int]:
    """Drive ``url`` with one fixed request, or with a ``--fresh`` script (its path)."""
    if isinstance(request, str):
        script_path = request
    else:
        _, body, headers = request
        lua = LUA.format(
            body=json.dumps(body.decode()),
            headers="\n".join(
                f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()
            ),
        )
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(lua)
        script_path = script.name
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script_path, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if not isinstance(request, str):
        os.unlink(script_path)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, ms("50%"), ms("99%"), int(bad.group(1)) if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument(
        "--workers", help="e.g. 1,2: measure `switchboard ingest http --workers N` for each N"
    )
    parser.add_argument("--skip-mailgun", action="store_true")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="Switchboard's (WARNING: no line per message; the default INFO logs each "
        "accepted message, to /dev/null here)",
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=0,
        metavar="N",
        help="every request a new message, N prepared per run (e.g. 60000); see above",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the whole sequence R times in turn; see above"
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    rounds: list[dict[tuple[str, int], float]] = []
    for round_ in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {round_} of {args.rounds}, {time.strftime('%H:%M:%S')}", flush=True)
        rounds.append(one_round(args))
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds (each round's ratio against its own bare hook):")
        print_ratios(args, rounds)


def one_round(args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """Measure the bare hooks, then every target; print each ratio; the rates."""
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], float] = {}
    targets = (
        [("run", ["run"])]
        if not args.workers
        else [(f"x{n}", ["ingest", "http", "--workers", n]) for n in args.workers.split(",") if n]
    )

    def measure(name: str, request: Request, make: Fresh | None = None) -> None:
        """``make``: the n-th new message, sent instead of ``request`` with --fresh."""
        url = request[0]
        for conns in levels:
            made = (
                [fresh_script(make, args.fresh, f"{time.time_ns()}-{conns}-{p}") for p in "wm"]
                if args.fresh and make is not None
                else []
            )
            runs: list[Request | str] = [script for script, _ in made] or [request, request]
            try:
                wrk(url, runs[0], 2, conns)  # warm up
                rate, p50, p99, bad = wrk(url, runs[1], args.seconds, conns)
            finally:
                for path in (path for pair in made for path in pair):
                    os.unlink(path)
            results[(name, conns)] = rate
            note = f"  ({bad} non-2xx)" if bad else ""
            repeated = bool(made) and rate * args.seconds > args.fresh
            if repeated and not name.startswith("bare"):  # the bare hooks store nothing
                note += f"  (more than {args.fresh:,} requests: some repeated)"
            latency = f"p50 {p50:6.1f} ms   p99 {p99:6.1f} ms"
            print(f"{name:<13} c={conns:<3} {rate:>8,.0f} req/s   {latency}{note}", flush=True)

    for name, http_parser in (("bare", "auto"), ("bare-h11", "h11")):
        port = free_port()
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(port), http_parser])
        try:
            wait_http(port)
            url = f"http://127.0.0.1:{port}/hook"

            def to_bare(n: str, url: str = url, port: int = port) -> Request:
                return url, *json_hook_request(port, n)[1:]

            measure(
                name,
                (url, b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}),
                to_bare,
            )
        finally:
            bare.terminate()
            bare.wait(10)

    for label, command in targets:
        suffix = "" if label == "run" else f" {label}"
        switchboard(
            command, suffix, measure, skip_mailgun=args.skip_mailgun, log_level=args.log_level
        )
    print_ratios(args, [results])
    return results


def print_ratios(args: argparse.Namespace, rounds: list[dict[tuple[str, int], float]]) -> None:
    """Each target's rate over each bare hook's: with several rounds, the median of
    the rounds' ratios (and their range), each round against its own bare hook."""
    levels = [int(c) for c in args.concurrency.split(",")]
    suffixes = [""] if not args.workers else [f" x{n}" for n in args.workers.split(",") if n]
    for conns in levels:
        for ceiling in ("bare", "bare-h11"):
            for suffix in suffixes:
                ratios = []
                for name in ("twilio", "json-hook", "mailgun"):
                    key = (name + suffix, conns)
                    found = [r[key] / r[(ceiling, conns)] for r in rounds if key in r]
                    if not found:
                        continue
                    text = f"{name}/{ceiling} {statistics.median(found):.0%}"
                    if len(found) > 1:
                        text += f" ({min(found):.0%}-{max(found):.0%})"
                    ratios.append(text)
                print(f"c={conns:<3}{suffix:<4} {'   '.join(ratios)}")


#: The `switchboard` command of this interpreter's environment.
SWITCHBOARD = str(Path(sys.executable).with_name("switchboard"))


def edge_env(port: int, data: str, config: Path, log_level: str = "WARNING") -> dict[str, str]:
    """The environment of a bench's `switchboard` edge with the bench's hooks: this
    process's, with the port, the data directory, the config file, the Twilio token
    and the hook's secret, and an embedded broker of its own (never a configured one)."""
    env = {
        **os.environ,
        "SWITCHBOARD_HTTP_PORT": str(port),
        "SWITCHBOARD_SMTP_ENABLED": "false",
        "SWITCHBOARD_DATA_DIR": data,
        "SWITCHBOARD_CONFIG": str(config),
        "SWITCHBOARD_LOG_LEVEL": log_level,
        "SWITCHBOARD_TWILIO_AUTH_TOKEN": TOKEN,
        "BENCH_SECRET": SECRET,
        "SWITCHBOARD_KAFKA_EMBEDDED": "true",
    }
    env.pop("SWITCHBOARD_KAFKA_BOOTSTRAP", None)
    return env


def switchboard(
    command: list[str],
    suffix: str,
    measure: Callable[[str, Request, Fresh | None], None],
    *,
    skip_mailgun: bool,
    log_level: str = "WARNING",
) -> None:
    """Start `switchboard <command>` with the bench's hooks and measure each hook."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        config = Path(data) / "switchboard.toml"
        config.write_text(HOOK_CONFIG + "\n[adapters.mailgun]\nmax_age_s = 3600\n")
        env = edge_env(port, data, config, log_level)
        env["SWITCHBOARD_MAILGUN_SIGNING_KEY"] = SECRET
        sb = subprocess.Popen(
            [SWITCHBOARD, *command],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(port)
            time.sleep(3)  # every worker started, not only the first
            measure(
                "twilio" + suffix,
                twilio_request(port),
                lambda n: twilio_request(port, n),
            )
            measure(
                "json-hook" + suffix,
                json_hook_request(port),
                lambda n: json_hook_request(port, n),
            )
            if skip_mailgun:
                return
            # A parsed Mailgun route (a 1 KB email, rebuilt into MIME and normalized
            # like SMTP mail), signed once: the same token replays within max_age_s.
            stamp, token = str(int(time.time())), "b" * 50
            mail_headers = [
                ["From", "Ann <ann@example.com>"],
                ["To", "support@example.com"],
                ["Subject", "Where is my order?"],
                ["Message-ID", "<bench-1@mail.example.com>"],
                ["Date", "Sun, 22 Nov 2026 10:00:00 +0000"],
            ]
            form = {
                "recipient": "support@example.com",
                "sender": "ann@example.com",
                "from": "Ann <ann@example.com>",
                "subject": "Where is my order?",
                "body-plain": "Hello, my order has not arrived yet. " * 25,
                "message-headers": json.dumps(mail_headers),
                "timestamp": stamp,
                "token": token,
                "signature": hmac.new(
                    SECRET.encode(), (stamp + token).encode(), hashlib.sha256
                ).hexdigest(),
            }
            measure(
                "mailgun" + suffix,
                (
                    f"http://127.0.0.1:{port}/webhooks/mailgun",
                    urlencode(form).encode(),
                    {"Content-Type": "application/x-www-form-urlencoded"},
                ),
                None,  # the same parsed email each time, with or without --fresh
            )
        finally:
            sb.terminate()
            sb.wait(15)


if __name__ == "__main__":
    main()
