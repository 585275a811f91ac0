"""Which webhook URLs the service sends to: checked when a job is submitted (422) and, for the
addresses, again at every delivery, on the address actually connected to (a name that resolved to a
public address at submit may resolve to 127.0.0.1 later: DNS rebinding)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

MAX_URL_LENGTH = 2000  # the column's width

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookUrlError(ValueError):
    """A URL the service will not send to; ``code`` is the API's error code."""

    def __init__(self, message: str, code: str = "webhook_url_invalid") -> None:
        super().__init__(message)
        self.code = code


def parse(url: str) -> SplitResult:
    """The URL's parts, if it is one the service may send to at all (before any name lookup)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"webhook_url is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii():
        raise WebhookUrlError(
            "webhook_url must be ASCII: write an international host name in punycode (xn--...) and "
            "percent-encode the path"
        )
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise WebhookUrlError("webhook_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise WebhookUrlError(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError("webhook_url must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # Credentials in a URL end up in logs and in the job object that lists it.
        raise WebhookUrlError(
            "webhook_url must not hold credentials (user:password@); authenticate the sender by its "
            "signature (webhook-signature) instead"
        )
    if not parts.hostname:
        raise WebhookUrlError("webhook_url has no host")
    if port == 0:
        raise WebhookUrlError("webhook_url's port must be between 1 and 65535")
    return parts


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why an address is not a public one a webhook may reach, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for reason, hit in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not globally routable", not ip.is_global),
    ):
        if hit:
            return reason
    return None


def resolve(host: str, port: int, *, allow_private: bool) -> list[IPAddress]:
    """The addresses ``host`` resolves to, all of them allowed; ``WebhookUrlError`` otherwise. Every
    address must be allowed (not just one): the connection may go to any of them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise WebhookUrlError(f"webhook_url's host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    if not allow_private:
        for ip in addresses:
            reason = forbidden_reason(ip)
            if reason is not None:
                raise WebhookUrlError(
                    f"webhook_url's host {host!r} resolves to {ip}, a {reason} address; webhooks go to "
                    "public addresses only (the operator may allow others with "
                    "LAFTER_WEBHOOK_ALLOW_PRIVATE=true)",
                    code="webhook_url_forbidden",
                )
    if not addresses:
        raise WebhookUrlError(f"webhook_url's host {host!r} does not resolve")
    return addresses


def default_port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def validate(url: str, *, allow_private: bool) -> str:
    """The URL as given, if the service may send to it now (``WebhookUrlError`` otherwise)."""
    parts = parse(url)
    assert parts.hostname is not None
    resolve(parts.hostname, default_port(parts), allow_private=allow_private)
    return url
