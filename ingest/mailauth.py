"""Who really sent this mail: SPF, DKIM, ARC and DMARC, checked here or read from a
trusted upstream's ``Authentication-Results``, as an :class:`EmailVerdict` for the
(pure) normalizer.

Libraries, and why:

- ``dkimpy`` verifies DKIM and ARC (RFC 6376, 8617): the reference Python
  implementation (it is what authheaders, OpenARC's tests and many MTAs' milters use),
  maintained, and it takes a ``dnsfunc`` so every key lookup goes through our resolver.
- ``pyspf`` evaluates SPF (RFC 7208) with its lookup limits and a total query time;
  its DNS goes through :func:`_spf_lookup` (pyspf has no per-call resolver argument).
- ``dnspython`` is the resolver: configurable servers and ports, per-query lifetime,
  and an LRU cache that keeps each answer only for its TTL.
- ``publicsuffixlist`` gives the organizational domain for relaxed alignment; it ships
  a current Public Suffix List and works offline.
- ``authres`` parses Authentication-Results (RFC 8601) headers.

DMARC itself (RFC 7489 sections 6.6.2-6.6.3: record discovery, alignment) is the
few lines below rather than authheaders' ``dmarc_per_from``: that one treats a DNS
failure as "no record" (a temperror would read as dmarc=none), re-reads the suffix
list file on every alignment check, and its SPF step cannot use our resolver.
``checkdmarc`` audits a domain's records; it does not judge a message.

A DNS failure is ``temperror``: the message is accepted and the sender stays
claimed. Every lookup shares one deadline per message, so a dead resolver costs at
most ``verify_timeout_s``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

import authres
import dkim
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from normalize.email import EmailVerdict
from normalize.identity import IdentityError, canonical_email
from normalize.schema import AuthCheck, Authentication, AuthResult

log = logging.getLogger(__name__)

_RESULTS: frozenset[str] = frozenset(
    {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"}
)
# Older or vendor spellings seen in Authentication-Results headers.
_RESULT_ALIASES = {"hardfail": "fail", "error": "temperror", "unknown": "permerror"}
_METHODS = ("spf", "dkim", "dmarc", "arc")
MAX_SIGNATURES = 5  # DKIM signatures tried per message; more is a cost attack
_PSL: PublicSuffixList | None = None
_PSL_LOCK = threading.Lock()


class DnsTempError(Exception):
    """No answer in time, or the resolver failed: RFC 8601 ``temperror``."""


def _psl() -> PublicSuffixList:
    global _PSL  # noqa: PLW0603 - parsed once (about 50 ms), on first use, not at import
    with _PSL_LOCK:
        if _PSL is None:
            _PSL = PublicSuffixList()
        return _PSL


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 section 3.2): one label below the public suffix."""
    return str(_psl().privatesuffix(domain) or domain)


def _nameserver(server: str) -> dns.nameserver.Do53Nameserver:
    host, port = server.strip(), 53
    if host.startswith("["):  # [::1]:5353
        host, _, rest = host[1:].partition("]")
        port = int(rest.lstrip(":") or 53)
    elif host.count(":") == 1:  # 127.0.0.1:5353 (a bare IPv6 address has several colons)
        host, _, text = host.partition(":")
        port = int(text)
    ipaddress.ip_address(host)  # a name here would need a resolver to find the resolver
    return dns.nameserver.Do53Nameserver(host, port)


class Resolver:
    """TXT/A/MX lookups with a per-message deadline and a TTL- and size-bounded cache."""

    def __init__(self, servers: Sequence[str], timeout_s: float, cache_size: int) -> None:
        if servers:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [_nameserver(s) for s in servers]
        else:
            try:
                resolver = dns.resolver.Resolver()  # the system's (/etc/resolv.conf)
            except dns.resolver.NoResolverConfiguration:
                # No resolver at all: every check is a temperror, the mail still flows.
                log.warning("no system DNS resolver: sender checks will all be temperror")
                resolver = dns.resolver.Resolver(configure=False)
        if cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        resolver.retry_servfail = False
        self._resolver = resolver
        self.timeout_s = timeout_s

    def lookup(self, name: str, rdtype: str, deadline: float) -> dns.resolver.Answer | None:
        """The answer, None when the name or the type does not exist; DnsTempError else."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DnsTempError("verification time limit reached")
        try:
            return self._resolver.resolve(
                name, rdtype, lifetime=min(self.timeout_s, remaining), search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except dns.exception.Timeout as exc:
            raise DnsTempError(f"DNS timeout for {name} {rdtype}") from exc
        except dns.exception.DNSException as exc:  # SERVFAIL, no servers, bad reply
            raise DnsTempError(f"DNS error for {name} {rdtype}: {type(exc).__name__}") from exc

    def txt(self, name: str, deadline: float) -> list[bytes]:
        answer = self.lookup(name, "TXT", deadline)
        if answer is None:
            return []
        return [b"".join(rdata.strings) for rdata in answer]


# pyspf looks names up through its module-level DNSLookup. It is replaced once by a
# function that uses the resolver of the check running on this thread.
_local = threading.local()
_spf_installed = False
_spf_lock = threading.Lock()


def _spf_lookup(name: str, qtype: str, tcpfallback: bool = True, timeout: float = 30) -> list[Any]:
    current: tuple[Resolver, float] | None = getattr(_local, "dns", None)
    if current is None:
        return list(_ORIGINAL_SPF_LOOKUP(name, qtype, tcpfallback, timeout))
    resolver, deadline = current
    try:
        answer = resolver.lookup(name, qtype, deadline)
    except DnsTempError as exc:
        raise spf.TempError(str(exc)) from exc
    if answer is None:
        return []
    found: list[Any] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


_ORIGINAL_SPF_LOOKUP = spf.DNSLookup


def _install_spf_lookup() -> None:
    global _spf_installed  # noqa: PLW0603 - once per process, when a verifier is built
    with _spf_lock:
        if not _spf_installed:
            spf.DNSLookup = _spf_lookup
            _spf_installed = True


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session saw: the inputs of SPF."""

    peer: str
    helo: str | None
    mail_from: str  # "" for the null reverse path


def _result(value: str | bytes | None) -> AuthResult | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = (value or "").strip().lower()
    text = _RESULT_ALIASES.get(text, text)
    return text if text in _RESULTS else None  # type: ignore[return-value]


def _check(
    method: str, result: AuthResult, domain: str | None = None, detail: str | None = None
) -> AuthCheck:
    return AuthCheck(
        method=method,  # type: ignore[arg-type]
        result=result,
        domain=domain[:255] if domain else None,
        detail=detail[:500] if detail else None,
    )


def _headers(raw: bytes) -> Message:
    return BytesHeaderParser(policy=policy.compat32).parsebytes(raw)


def from_domain(headers: Message) -> str | None:
    """The From domain DMARC judges: one From header with one address, else None."""
    values = headers.get_all("From") or []
    if len(values) != 1:
        return None
    try:
        pairs = getaddresses([str(values[0])])
    except Exception:  # noqa: BLE001 - hostile syntax: nothing to align with
        return None
    addresses = [a for _, a in pairs if a]
    if len(addresses) != 1:
        return None
    try:
        return canonical_email(addresses[0]).rsplit("@", 1)[1]
    except IdentityError:
        return None


def from_domain_of(raw: bytes) -> str | None:
    """:func:`from_domain` of a message's (or a header block's) bytes."""
    return from_domain(_headers(raw))


def _aligned(domain: str | None, from_dom: str, mode: str) -> bool:
    if not domain:
        return False
    domain = domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_dom
    return org_domain(domain) == org_domain(from_dom)


def _dmarc_record(resolver: Resolver, domain: str, deadline: float) -> dict[str, str] | None:
    records = [
        t.decode("utf-8", "replace")
        for t in resolver.txt(f"_dmarc.{domain}", deadline)
        if re.match(rb"\s*v\s*=\s*DMARC1\s*(;|$)", t)
    ]
    if len(records) != 1:  # none, or several: RFC 7489 6.6.3 says no policy
        return None
    tags: dict[str, str] = {}
    for part in records[0].split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip().lower()
    if tags.get("p") not in ("none", "quarantine", "reject"):
        return None
    return tags


def _dmarc(  # noqa: PLR0911 - one return per RFC 7489 outcome reads best
    resolver: Resolver,
    deadline: float,
    from_dom: str | None,
    spf_check: AuthCheck | None,
    dkim_checks: Sequence[AuthCheck],
) -> AuthCheck:
    if from_dom is None:
        return _check("dmarc", "permerror", None, "From must hold exactly one address")
    try:
        record = _dmarc_record(resolver, from_dom, deadline)
        org = org_domain(from_dom)
        if record is None and org != from_dom:
            record = _dmarc_record(resolver, org, deadline)
    except DnsTempError as exc:
        return _check("dmarc", "temperror", from_dom, str(exc))
    if record is None:
        return _check("dmarc", "none", from_dom, "no DMARC record")
    adkim, aspf = record.get("adkim", "r"), record.get("aspf", "r")
    for check in dkim_checks:
        if check.result == "pass" and _aligned(check.domain, from_dom, adkim):
            return _check("dmarc", "pass", from_dom, f"aligned dkim header.d={check.domain}")
    if (
        spf_check is not None
        and spf_check.result == "pass"
        and _aligned(spf_check.domain, from_dom, aspf)
    ):
        return _check("dmarc", "pass", from_dom, f"aligned spf smtp.mailfrom={spf_check.domain}")
    pending = [c for c in (spf_check, *dkim_checks) if c is not None and c.result == "temperror"]
    if pending:
        return _check("dmarc", "temperror", from_dom, "a check it depends on had no DNS answer")
    return _check("dmarc", "fail", from_dom, f"no aligned pass (p={record.get('p')})")


class Verifier:
    """The SMTP adapter's checks; one per adapter, used from worker threads."""

    def __init__(
        self,
        resolver: Resolver,
        budget_s: float,
        trusted_arc_sealers: Collection[str] = (),
    ) -> None:
        _install_spf_lookup()
        _psl()
        self.resolver = resolver
        self.budget_s = budget_s
        self.trusted_arc_sealers = frozenset(trusted_arc_sealers)

    def _dnsfunc(self, deadline: float) -> Any:  # noqa: ANN401 - dkimpy's callback shape
        def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            records = self.resolver.txt(text, deadline)
            return records[0] if records else None

        return get_txt

    def verify(self, raw: bytes, envelope: Envelope) -> EmailVerdict:
        """Every check; never raises (a bug in a check is its permerror, not a lost mail)."""
        deadline = time.monotonic() + self.budget_s
        headers = _headers(raw)
        from_dom = from_domain(headers)
        spf_check = self._spf(envelope, deadline)
        dkim_checks = self._dkim(raw, headers, deadline)
        arc_check, arc_dmarc = self._arc(raw, headers, deadline)
        dmarc = _dmarc(self.resolver, deadline, from_dom, spf_check, dkim_checks)
        checks = (spf_check, *dkim_checks, dmarc, *((arc_check,) if arc_check else ()))
        authentication = Authentication(source="local", checks=checks[:50])
        if dmarc.result == "pass" and from_dom is not None:
            return EmailVerdict(authentication, from_dom, f"dmarc=pass header.from={from_dom}")
        if (
            arc_dmarc is not None
            and from_dom is not None
            and arc_dmarc == from_dom
            and dmarc.result in ("fail", "temperror")
            and arc_check is not None
            and arc_check.result == "pass"
        ):
            # RFC 8617 section 7.2.1: a receiver may override a DMARC failure for mail a
            # sealer it trusts forwarded after checking DMARC itself (a list, a forwarder).
            evidence = f"arc=pass sealer={arc_check.domain} dmarc=pass header.from={from_dom}"
            return EmailVerdict(authentication, from_dom, evidence)
        return EmailVerdict(authentication)

    def _spf(self, envelope: Envelope, deadline: float) -> AuthCheck:
        helo = (envelope.helo or "").strip()
        sender = envelope.mail_from.strip().strip("<>")
        # The null reverse path (bounces): RFC 7208 section 2.4 checks postmaster@HELO.
        identity = sender if sender else f"postmaster@{helo}"
        domain = identity.rsplit("@", 1)[-1].lower() if "@" in identity else None
        try:
            ipaddress.ip_address(envelope.peer)
        except ValueError:
            return _check("spf", "none", domain, "no IP address for the client")
        if not domain:
            return _check("spf", "none", None, "no domain to check")
        _local.dns = (self.resolver, deadline)
        try:
            remaining = max(0.001, deadline - time.monotonic())
            query = spf.query(
                i=envelope.peer,
                s=identity,
                h=helo or domain,
                timeout=remaining,
                querytime=remaining,
            )
            result, _code, explanation = query.check()
        except Exception as exc:  # noqa: BLE001 - a pyspf bug must not lose the mail
            log.warning("spf check failed", extra={"error": repr(exc)})
            return _check("spf", "permerror", domain, f"{type(exc).__name__}")
        finally:
            _local.dns = None
        detail = f"{'smtp.helo' if not sender else 'smtp.mailfrom'}={identity}"
        if explanation:
            detail = f"{detail}; {explanation}"
        return _check("spf", _result(result) or "permerror", domain, detail)

    def _dkim(self, raw: bytes, headers: Message, deadline: float) -> list[AuthCheck]:
        signatures = headers.get_all("DKIM-Signature") or []
        if not signatures:
            return [_check("dkim", "none", None, "no signature")]
        checks: list[AuthCheck] = []
        dnsfunc = self._dnsfunc(deadline)
        for idx, signature in enumerate(signatures[:MAX_SIGNATURES]):
            domain = _tag(str(signature), "d")
            try:
                signer = dkim.DKIM(raw, minkey=1024, timeout=self.resolver.timeout_s)
                ok = signer.verify(idx=idx, dnsfunc=dnsfunc)
                if ok and _tag(str(signature), "l") is not None:
                    # l= signs only the first bytes of the body: anyone may append
                    # their own text (an IBAN) under a valid signature. It proves nothing.
                    detail = "l= body length limit: the rest of the body is unsigned"
                    checks.append(_check("dkim", "policy", domain, detail))
                    continue
                checks.append(_check("dkim", "pass" if ok else "fail", domain, None))
            except DnsTempError as exc:
                checks.append(_check("dkim", "temperror", domain, str(exc)))
            except dkim.KeyFormatError as exc:  # the published key is unusable
                checks.append(_check("dkim", "permerror", domain, str(exc)))
            except dkim.DKIMException as exc:  # body hash mismatch, bad signature syntax
                checks.append(_check("dkim", "fail", domain, str(exc)))
            except Exception as exc:  # noqa: BLE001 - hostile input reaching a dkimpy bug
                checks.append(_check("dkim", "permerror", domain, type(exc).__name__))
        return checks

    def _arc(
        self, raw: bytes, headers: Message, deadline: float
    ) -> tuple[AuthCheck | None, str | None]:
        """The chain's validity, and the From domain its newest trusted sealer saw pass DMARC."""
        if not headers.get_all("ARC-Seal"):
            return None, None
        sealer: str | None = None
        try:
            cv, results, comment = dkim.arc_verify(raw, dnsfunc=self._dnsfunc(deadline))
            if results:
                found = results[0].get("as-domain")
                sealer = found.decode("ascii", "replace").lower() if found else None
            result = _result(cv) or "fail"
            check = _check("arc", result, sealer, str(comment))
        except DnsTempError as exc:
            return _check("arc", "temperror", None, str(exc)), None
        except Exception as exc:  # noqa: BLE001 - hostile input reaching a dkimpy bug
            return _check("arc", "permerror", None, type(exc).__name__), None
        if check.result != "pass" or sealer not in self.trusted_arc_sealers:
            return check, None
        return check, _arc_dmarc_domain(headers, sealer)


def _tag(header: str, name: str) -> str | None:
    match = re.search(rf"(?:^|;)\s*{name}\s*=\s*([^;\s]+)", re.sub(r"\s+", " ", header))
    return match.group(1).lower().rstrip(".") if match else None


def _arc_dmarc_domain(headers: Message, sealer: str) -> str | None:
    """``header.from`` of a dmarc=pass in the newest ARC-Authentication-Results."""
    newest: tuple[int, str] | None = None
    for value in headers.get_all("ARC-Authentication-Results") or []:
        text = re.sub(r"\r?\n[ \t]+", " ", str(value))
        instance, sep, rest = text.partition(";")
        match = re.fullmatch(r"\s*i\s*=\s*(\d+)\s*", instance)
        if sep and match and (newest is None or int(match.group(1)) > newest[0]):
            newest = (int(match.group(1)), rest)
    if newest is None:
        return None
    parsed = _parse_results(newest[1])
    if parsed is None:
        return None
    for method, result, props, _ in parsed[1]:
        if method == "dmarc" and result == "pass":
            return props.get("header.from")
    return None


# -- trusted upstreams ---------------------------------------------------------


def _parse_results(
    value: str,
) -> tuple[str, list[tuple[str, AuthResult, dict[str, str], str | None]]] | None:
    try:
        header = authres.AuthenticationResultsHeader.parse_value(re.sub(r"\r?\n[ \t]+", " ", value))
    except Exception:  # noqa: BLE001 - authres raises several kinds on junk
        return None
    found: list[tuple[str, AuthResult, dict[str, str], str | None]] = []
    for item in header.results:
        method = str(item.method).lower()
        result = _result(str(item.result))
        if method not in _METHODS or result is None:
            continue
        props = {
            f"{p.type}.{p.name}".lower(): str(p.value).strip().lower() for p in item.properties
        }
        found.append((method, result, props, str(item.reason) if item.reason else None))
    return str(header.authserv_id).lower(), found


def _domain_of(props: dict[str, str], method: str) -> str | None:
    keys = {
        "spf": ("smtp.mailfrom", "smtp.helo"),
        "dkim": ("header.d", "header.i"),
        "dmarc": ("header.from",),
        "arc": ("header.oldest-pass",),
    }[method]
    for key in keys:
        value = props.get(key)
        if value:
            return value.rsplit("@", 1)[-1].rstrip(".") or None
    return None


def judge_authserv(
    raw: bytes, trusted_ids: Collection[str], source: str = ""
) -> EmailVerdict | None:
    """The verdict of the topmost Authentication-Results header whose authserv-id is
    trusted, or None. Headers below it came with the message (anyone can write them)
    and headers from other ids are someone else's opinion: both are ignored.

    ``source`` names the verdict ('authserv:<id>' by default, 'provider:<name>' for a
    provider's header)."""
    trusted = {t.lower().rstrip(".") for t in trusted_ids}
    if not trusted:
        return None
    try:
        return _judge_authserv(_headers(raw), trusted, source)
    except Exception:  # a verdict is never worth the message: no verdict, claimed
        log.exception("reading Authentication-Results failed")
        return None


def _authserv_id(value: str) -> str | None:
    """The authserv-id a header names (its first token, after any comment), read
    without the full grammar: so a header that is the trusted upstream's but does not
    parse is still known to be the upstream's."""
    text = value.strip()
    while text.startswith("("):
        end = text.find(")")
        if end < 0:
            return None
        text = text[end + 1 :].lstrip()
    match = re.match(r"[^\s;()]+", text)
    return match.group(0).lower() if match else None


def _judge_authserv(headers: Message, trusted: set[str], source: str) -> EmailVerdict | None:
    for value in headers.get_all("Authentication-Results") or []:  # topmost first
        parsed = _parse_results(str(value))
        if _authserv_id(str(value)) not in trusted and (parsed is None or parsed[0] not in trusted):
            continue
        # The topmost trusted header decides, readable or not: one that does not parse
        # (the upstream may copy sender-chosen text into it) gives no verdict, never the
        # next one down, which came with the mail (attacker review, 2026-11-30).
        if parsed is None or parsed[0] not in trusted:
            log.warning("the trusted Authentication-Results header does not parse: no verdict")
            return None
        authserv_id, results = parsed
        name = source or f"authserv:{authserv_id}"
        checks = tuple(
            _check(method, result, _domain_of(props, method), reason)
            for method, result, props, reason in results[:50]
        )
        verdict_from = from_domain(headers)
        for check in checks:
            if check.method == "dmarc" and check.result == "pass" and check.domain == verdict_from:
                evidence = f"{name} dmarc=pass header.from={check.domain}"
                return EmailVerdict(
                    Authentication(source=name, checks=checks), check.domain, evidence
                )
        return EmailVerdict(Authentication(source=name, checks=checks))
    return None


def in_networks(peer: str, networks: Collection[str]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


# -- providers -------------------------------------------------------------------


def sendgrid_verdict(
    spf_field: str | None, dkim_field: str | None, mail_from: str | None, header_from: str | None
) -> EmailVerdict | None:
    """SendGrid Inbound Parse's ``SPF`` and ``dkim`` fields (``{@example.com : pass}``).

    SendGrid gives no DMARC result. A DKIM pass for exactly the From domain is aligned
    under any DMARC policy (strict or relaxed), so it counts as DMARC's pass; SPF
    alone does not (it speaks for the envelope, and SendGrid does not say which
    alignment the domain asks for)."""
    checks: list[AuthCheck] = []
    envelope_domain = mail_from.strip("<> ").rsplit("@", 1)[-1].lower() if mail_from else None
    spf_result = _result(spf_field)
    if spf_result is not None:
        checks.append(_check("spf", spf_result, envelope_domain or None))
    passed: str | None = None
    for domain, result_text in re.findall(r"@([A-Za-z0-9.-]+)\s*:\s*([A-Za-z]+)", dkim_field or ""):
        result = _result(result_text)
        if result is None:
            continue
        checks.append(_check("dkim", result, domain.lower()))
        if result == "pass" and header_from is not None and domain.lower() == header_from:
            passed = header_from
    if not checks:
        return None
    authentication = Authentication(source="provider:sendgrid", checks=tuple(checks[:50]))
    if passed is None:
        return EmailVerdict(authentication)
    return EmailVerdict(authentication, passed, f"provider:sendgrid dkim=pass header.d={passed}")


def mailgun_verdict(
    spf_field: str | None, dkim_field: str | None, mail_from: str | None
) -> EmailVerdict | None:
    """Mailgun's ``X-Mailgun-Spf`` and ``X-Mailgun-Dkim-Check-Result`` fields.

    Recorded, never a verification: the DKIM result names no signing domain, so its
    alignment with From is unknown, and SPF speaks only for the envelope."""
    checks: list[AuthCheck] = []
    spf_result = _result(spf_field)
    if spf_result is not None:
        domain = mail_from.strip("<> ").rsplit("@", 1)[-1].lower() if mail_from else None
        checks.append(_check("spf", spf_result, domain or None))
    dkim_result = _result(dkim_field)
    if dkim_result is not None:
        checks.append(_check("dkim", dkim_result, None, "signing domain not given by Mailgun"))
    if not checks:
        return None
    return EmailVerdict(Authentication(source="provider:mailgun", checks=tuple(checks)))


def postmark_verdict(received_spf: str | None) -> EmailVerdict | None:
    """Postmark's ``Received-SPF`` header: recorded, never a verification (SPF is about
    the envelope; Postmark passes no DKIM or DMARC verdict of its own)."""
    if not received_spf:
        return None
    result = _result(received_spf.strip().split(" ", 1)[0])
    if result is None:
        return None
    domain = _tag(received_spf.replace(" ", ";"), "envelope-from")
    if domain:
        domain = domain.strip("<>").rsplit("@", 1)[-1]
    check = _check("spf", result, domain or None, received_spf[:500])
    return EmailVerdict(Authentication(source="provider:postmark", checks=(check,)))
