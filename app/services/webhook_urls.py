"""Which webhook URLs the server may call: checked at creation (422) and again at every delivery.

A receiver URL is https (http only with STABLETRAIN_WEBHOOK_ALLOW_HTTP=1) and every address its host
resolves to is a public one (loopback, private, link-local, reserved, multicast, unspecified and
other non-global addresses are refused unless STABLETRAIN_WEBHOOK_ALLOW_PRIVATE=1), so a webhook
cannot be aimed at the server's own network. The delivery resolves again, checks every address and
connects to the checked one (a DNS answer that changed since, DNS rebinding, cannot redirect it).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeUrl(ValueError):
    """The URL may not be called; the message says why in words a user can act on."""


@dataclass(frozen=True)
class Target:
    """Where a delivery connects: the URL's parts and the checked address to use."""

    scheme: str
    host: str  # as written in the URL (the Host header, TLS server name and certificate check use it)
    port: int
    path: str  # path and query
    address: str


def flag(value: object) -> bool:
    """A config switch given as 1/true/yes (or a JSON true)."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (IPv4-mapped, 6to4, Teredo), which is where packets go."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return None


def non_public_reason(ip: IPAddress) -> str | None:
    """Why this address is not a public one (None when it is)."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        reason = non_public_reason(inner)
        return f"{reason} (inside {ip})" if reason else None
    checks = (("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("private", ip.is_private),
              ("multicast", ip.is_multicast), ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved),
              ("not globally routable", not ip.is_global))
    return next((f"{ip} is a {name} address" for name, hit in checks if hit), None)


def parse_url(url: str, allow_http: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of an acceptable URL; UnsafeUrl otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeUrl(f"must be at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"is not a valid URL ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise UnsafeUrl("must be an https:// URL" + ("" if allow_http else
                        " (http:// is accepted only when the server sets STABLETRAIN_WEBHOOK_ALLOW_HTTP=1)"))
    if not parts.hostname:
        raise UnsafeUrl("has no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("must not carry credentials (user:password@); use the signature to authenticate")
    if parts.fragment:
        raise UnsafeUrl("must not have a #fragment")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (an IP literal is its own), in the resolver's order."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"host {host!r} does not resolve ({exc})") from exc
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UnsafeUrl(f"host {host!r} does not resolve")
    return addresses


def check_url(url: str, *, allow_http: bool = False, allow_private: bool = False) -> Target:
    """Resolve the URL's host and check every address; the Target names the first (checked) one."""
    scheme, host, port, path = parse_url(url, allow_http)
    addresses = resolve(host, port)
    if not allow_private:
        for ip in addresses:
            reason = non_public_reason(ip)
            if reason:
                raise UnsafeUrl(f"host {host!r} resolves to {ip}: {reason}; webhooks are sent to public "
                                "addresses only (STABLETRAIN_WEBHOOK_ALLOW_PRIVATE=1 lifts this)")
    return Target(scheme, host, port, path, str(addresses[0]))
