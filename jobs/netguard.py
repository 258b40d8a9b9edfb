"""Where the service may send outgoing requests (webhooks): public addresses only, unless allow-listed.

A webhook URL is checked twice: when a job is submitted (the user gets a 400 at once) and again
right before each delivery, because DNS may have changed in between. The delivery then connects to
the address that passed the check (``Target.address``), not to whatever the name resolves to a
moment later, so a name cannot pass the check with a public address and be used with a private
one (DNS rebinding).

Refused unless the operator allow-lists them (settings ``webhook_allow_hosts`` /
``webhook_allow_networks``): loopback, private, link-local (cloud metadata 169.254.169.254),
shared (100.64/10), multicast, reserved and unspecified addresses, IPv4 written in odd forms
(``0x7f000001``, ``2130706433``) which resolve to those, and internal names (a name without a dot,
such as a compose service ``redis`` or ``minio``; ``localhost``; ``*.internal``, ``*.local``...).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".intranet", ".lan", ".home.arpa", ".corp",
                      ".localdomain")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """The URL may not be called from this service; the message is safe to show to the user."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the address the request must be sent to."""

    url: str
    scheme: str
    host: str        # the name as written (Host header, TLS server name)
    port: int
    target: str      # path and query
    address: str     # the checked IP the connection goes to

    def pinned_url(self) -> str:
        ip = ipaddress.ip_address(self.address)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{host}:{self.port}{self.target}"

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _networks(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def _public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def _address_allowed(ip: IPAddress, networks: list) -> bool:  # noqa: ANN001
    if any(ip.version == n.version and ip in n for n in networks):
        return True
    return _public(ip)


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an http(s) URL; UrlRefused for anything else."""
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise UrlRefused("webhook_url must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused("webhook_url is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlRefused("webhook_url must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("webhook_url must not carry credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UrlRefused("webhook_url has no host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def check_url(url: str, allow_hosts: list[str] | None = None, allow_networks: list[str] | None = None,
              resolver=socket.getaddrinfo) -> Target:  # noqa: ANN001
    """Resolve the URL's host and refuse it unless every address it has is allowed; see the module doc."""
    scheme, host, port, target = parse(url)
    allowed_host = host in {h.strip().rstrip(".").lower() for h in (allow_hosts or [])}
    networks = _networks(allow_networks or [])
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None and not allowed_host:
        if "." not in host or host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
            raise UrlRefused("webhook_url must name a public host (internal names are refused)")
        if host.replace(".", "").isdigit() or host.startswith("0x"):
            raise UrlRefused("webhook_url must write an IP address in the usual form")
    try:
        infos = resolver(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise UrlRefused("webhook_url's host does not resolve") from None
    addresses: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        try:
            addresses.append(ipaddress.ip_address(raw))
        except ValueError:
            continue
    if not addresses:
        raise UrlRefused("webhook_url's host does not resolve")
    if not allowed_host and not all(_address_allowed(ip, networks) for ip in addresses):
        # Every address must pass: a name with one public and one private record is refused.
        raise UrlRefused("webhook_url must point to a public address (loopback, private, link-local "
                         "and other internal addresses are refused)")
    return Target(url, scheme, host, port, target, str(addresses[0]))
