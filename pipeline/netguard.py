"""Address and URL safety for the fetcher: refuse what could reach internal infrastructure (an SSRF guard).

Two lists decide, and both are explicit because ``ipaddress``'s ``is_private`` / ``is_global`` do not fit:
they call the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) non-global,
yet those ranges cannot reach anyone's internal network, so we treat them as public (tests bind servers to them
inside a network namespace); and ``is_global`` is true for fec0::/10 and for 6to4 / NAT64 addresses that embed
a private IPv4 address.

- ``ALWAYS_REFUSED``: link-local (169.254.0.0/16 with the cloud metadata endpoint 169.254.169.254, fe80::/10),
  unspecified / "this network", multicast, reserved (240.0.0.0/4 with broadcast 255.255.255.255), discard-only,
  and known metadata addresses outside link-local. Refused even with ``allow_private``.
- ``PRIVATE``: loopback, RFC 1918, CGNAT 100.64.0.0/10, 192.0.0.0/24, benchmarking 198.18.0.0/15, unique-local
  fc00::/7, site-local fec0::/10, local-use NAT64. Refused unless ``allow_private`` (the demo site is on 127.0.0.1).

On top of the lists, anything ``ipaddress`` flags as loopback, link-local, multicast, unspecified or reserved is
refused, and IPv6 forms that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4 ``2002::/16``, Teredo ``2001::/32``, and a /96 inside local-use NAT64 ``64:ff9b:1::/48``) are judged by
the IPv4 address they carry.
"""

from __future__ import annotations

import re
import socket
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

ALLOWED_SCHEMES = frozenset({"http", "https"})

ALWAYS_REFUSED = tuple(
    ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "169.254.0.0/16",  # link-local, incl. cloud metadata 169.254.169.254 and ECS 169.254.170.2
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. limited broadcast 255.255.255.255
        "100.100.100.200/32",  # Alibaba Cloud metadata (inside CGNAT space)
        "::/128",  # unspecified
        "::/96",  # deprecated IPv4-compatible IPv6
        "100::/64",  # discard-only (RFC 6666)
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
        "fd00:ec2::254/128",  # AWS metadata over IPv6 (inside unique-local space)
    )
)

PRIVATE = tuple(
    ip_network(n)
    for n in (
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT shared space (RFC 6598)
        "127.0.0.0/8",  # loopback
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments (RFC 6890)
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking (RFC 2544), used inside labs
        "::1/128",  # loopback
        "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
        "fc00::/7",  # unique-local
        "fec0::/10",  # deprecated site-local
    )
)

_NAT64 = ip_network("64:ff9b::/96")
_LOCAL_NAT64 = ip_network("64:ff9b:1::/48")  # RFC 8215; a /96 inside it carries the IPv4 address in its low bits
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")  # after IDNA encoding; no empty labels
MAX_LABEL = 63  # octets per DNS label (RFC 1035); getaddrinfo's IDNA step raises UnicodeError beyond it
MAX_NAME = 253  # octets per host name, without the trailing dot
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class RefusedURL(Exception):
    """A URL the fetcher must not request; ``reason`` is its fetch status (refused_scheme, refused_address, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _embedded_ipv4(addr: IPv6Address) -> list[IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, NAT64, 6to4, Teredo); empty if none."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr in _NAT64 or addr in _LOCAL_NAT64:
        return [IPv4Address(int(addr) & 0xFFFFFFFF)]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        return list(addr.teredo)
    return []


def _classify(addr: IPv4Address | IPv6Address) -> str:
    """'public', 'private' (allowed with allow_private) or 'refused' (never allowed)."""
    if isinstance(addr, IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner:
            kinds = {_classify(a) for a in inner}
            return "refused" if "refused" in kinds else "private" if "private" in kinds else "public"
    if addr.is_loopback:  # before ALWAYS_REFUSED, whose ::/96 contains ::1
        return "private"
    if any(addr in net for net in ALWAYS_REFUSED if net.version == addr.version):
        return "refused"
    if any(addr in net for net in PRIVATE if net.version == addr.version):
        return "private"
    if addr.is_link_local or addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        return "refused"
    return "public"


def _as_address(ip: str | IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    return ip if isinstance(ip, IPv4Address | IPv6Address) else ip_address(ip)


def is_public_address(ip: str | IPv4Address | IPv6Address) -> bool:
    """True if ``ip`` is a public unicast address (documentation ranges count as public; see the module doc)."""
    return _classify(_as_address(ip)) == "public"


def address_allowed(ip: str | IPv4Address | IPv6Address, allow_private: bool) -> bool:
    """True if the fetcher may connect to ``ip``: public, or private/loopback when ``allow_private``."""
    kind = _classify(_as_address(ip))
    return kind == "public" or (allow_private and kind == "private")


def parse_ip_host(host: str) -> IPv4Address | IPv6Address | None:
    """The address a URL host denotes if it is an IP literal in any notation the resolver accepts, else None.

    Besides dotted quads and IPv6 (bracketed or not, with a scope id), this covers the inet_aton forms that
    getaddrinfo accepts: decimal ``2130706433``, hex ``0x7f000001``, octal ``0177.0.0.1``, short ``127.1``.
    """
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    h = h.rstrip(".") if ":" not in h else h
    if not h:
        return None
    try:
        return ip_address(h)
    except ValueError:
        pass
    if ":" in h or not h[0].isdigit():
        return None
    try:
        return IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def check_url(url: str | URL, allow_private: bool) -> None:
    """Raise :class:`RefusedURL` unless ``url`` is an http(s) URL without credentials to an allowed host.

    Host names are checked here for their form (DNS label and name lengths) and the local names (``localhost``);
    their resolved addresses are checked by the fetcher's resolver right before connecting.
    """
    try:
        u = url if isinstance(url, URL) else URL(url)
        scheme, host, user, password = u.scheme.lower(), u.raw_host, u.raw_user, u.raw_password
        u.port  # noqa: B018 - raises on a malformed port
    except (ValueError, TypeError, UnicodeError) as exc:
        raise RefusedURL("invalid_url", f"cannot parse URL: {exc}") from None
    if not scheme:
        raise RefusedURL("invalid_url", f"URL has no scheme: {str(url)[:200]}")
    if scheme not in ALLOWED_SCHEMES:
        raise RefusedURL("refused_scheme", f"scheme {scheme!r} is not http or https")
    if not host:
        raise RefusedURL("invalid_url", "URL has no host")
    if user is not None or password is not None:
        raise RefusedURL("invalid_url", "URL carries credentials")
    addr = parse_ip_host(host)
    if addr is None and (":" in host or host.replace(".", "").isdigit()):
        # aiohttp treats such hosts as IP literals and skips the resolver, so they must parse here.
        raise RefusedURL("invalid_url", f"malformed IP address {host!r}")
    if addr is not None:
        if not address_allowed(addr, allow_private):
            raise RefusedURL("refused_address", f"address {addr} is not public")
        return
    name = host.lower().rstrip(".")
    if not _HOST_NAME.fullmatch(name):
        raise RefusedURL("invalid_url", f"malformed host name {host[:100]!r}")
    if len(name) > MAX_NAME or any(len(label) > MAX_LABEL for label in name.split(".")):
        limits = f"labels up to {MAX_LABEL} octets, {MAX_NAME} in all"
        raise RefusedURL("invalid_url", f"host name too long ({limits}): {host[:100]!r}")
    if not allow_private and (name in _LOCAL_NAMES or name.endswith(".localhost")):
        raise RefusedURL("refused_address", f"host {name!r} is local")


# Special-use names that never resolve on the public DNS (RFC 2606, RFC 6761, RFC 6762 for .local): looking them
# up would only send a query to the configured DNS server, so the guard answers at once.
RESERVED_TLDS = frozenset({"invalid", "test", "example", "local", "onion"})


def is_reserved_name(host: str) -> bool:
    """True for names under a special-use top-level domain (``shop.invalid``, ``a.test``, ``printer.local``)."""
    return host.lower().rstrip(".").rsplit(".", 1)[-1] in RESERVED_TLDS


class AddressRefused(OSError):
    """A host name resolved to an address the fetcher may not connect to."""


class NameLookupError(OSError):
    """A host name did not resolve."""


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses the whole answer if any resolved address is not allowed.

    The connector connects only to the addresses this returns, so the check and the connection use the same
    lookup (no DNS-rebinding gap). ``inner`` does the lookup (default: getaddrinfo in a thread); tests pass a
    fixed mapping instead.
    """

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None):
        self.allow_private = allow_private
        self._inner = inner
        self._system = inner is None  # lookups go to the system's DNS (an injected table answers everything)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        """Resolve ``host`` and check every address."""
        if self._system and is_reserved_name(host):  # never resolvable: answer without asking any DNS server
            raise NameLookupError(f"{host!r} is under a reserved top-level domain (RFC 2606/6761)")
        if self._inner is None:
            self._inner = ThreadedResolver()
        try:
            results = await self._inner.resolve(host, port, family)
        except OSError as exc:
            raise NameLookupError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
        except ValueError as exc:  # UnicodeError too: getaddrinfo's IDNA encoding refuses the name
            raise NameLookupError(f"cannot resolve {host[:100]!r}: {type(exc).__name__}: {exc}") from None
        if not results:
            raise NameLookupError(f"no address for {host!r}")
        for res in results:
            if not address_allowed(res["host"], self.allow_private):
                raise AddressRefused(f"{host!r} resolves to non-public address {res['host']}")
        return results

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def input_options(url: str, storage_options: dict | None, allow_private: bool) -> dict:
    """fsspec options for reading an input file (a URL list, a WARC) at ``url`` under the fetcher's address rules.

    An http(s) URL is checked here, and its reads go through a client that checks every request, redirect hops
    included, and connects only to resolved addresses the guard allows; other schemes are returned unchanged.
    Raises :class:`RefusedURL` for a refused ``url``.
    """
    opts = dict(storage_options or {})
    if url.split(":", 1)[0].lower() not in ALLOWED_SCHEMES:
        return opts
    check_url(url, allow_private)
    opts["get_client"] = partial(_guarded_session, allow_private)
    return opts


async def _guarded_session(allow_private: bool, **kwargs):
    """An aiohttp session for fsspec's HTTP filesystem that refuses what the fetcher refuses."""
    import aiohttp

    async def check_start(session, ctx, params) -> None:
        check_url(params.url, allow_private)

    async def check_redirect(session, ctx, params) -> None:  # before the hop is requested, as aiohttp reads it
        location = params.response.headers.get("Location") or params.response.headers.get("URI")
        if location is not None:
            target = URL(location, encoded=not session.requote_redirect_url)
            check_url(params.url.join(target) if not target.absolute else target, allow_private)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(check_start)
    trace.on_request_redirect.append(check_redirect)
    kwargs["trace_configs"] = [*kwargs.get("trace_configs", ()), trace]
    kwargs["connector"] = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private))
    kwargs["trust_env"] = False  # a proxy would do the lookup and the connection where the guard cannot see
    return aiohttp.ClientSession(**kwargs)
