"""Address and URL safety: pure functions, plus the guarded resolver over a fake lookup (no traffic)."""

import asyncio
import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver

from pipeline.netguard import (
    AddressRefused,
    GuardedResolver,
    NameLookupError,
    RefusedURL,
    address_allowed,
    check_url,
    is_public_address,
    parse_ip_host,
)

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    # documentation ranges: public on purpose (the netns tests bind servers to them)
    "192.0.2.1",
    "198.51.100.7",
    "203.0.113.254",
    "2001:db8::1",
    # just outside refused blocks
    "172.15.255.255",
    "172.32.0.0",
    "100.63.255.255",
    "100.128.0.0",
    "169.253.255.255",
    "169.255.0.0",
    "198.17.255.255",
    "198.20.0.0",
    "192.0.1.255",
    "11.0.0.0",
    "223.255.255.255",
    "::ffff:8.8.8.8",  # IPv4-mapped public
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
]

# (address, refused even with allow_private)
NOT_PUBLIC = [
    ("127.0.0.1", False),
    ("127.255.255.254", False),
    ("10.0.0.1", False),
    ("10.255.255.255", False),
    ("172.16.0.1", False),
    ("172.31.255.255", False),
    ("192.168.1.1", False),
    ("100.64.0.1", False),  # CGNAT
    ("100.127.255.255", False),
    ("192.0.0.8", False),  # IETF protocol assignments
    ("198.18.0.1", False),  # benchmarking
    ("198.19.255.255", False),
    ("::1", False),
    ("fc00::1", False),  # unique-local
    ("fd12:3456:789a::1", False),
    ("fec0::1", False),  # site-local (ipaddress calls it global)
    ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
    ("::ffff:10.0.0.1", False),
    ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
    ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
    ("169.254.169.254", True),  # cloud metadata
    ("169.254.0.1", True),
    ("169.254.170.2", True),
    ("fe80::1", True),
    ("fe80::1%eth0", True),
    ("0.0.0.0", True),
    ("0.1.2.3", True),
    ("::", True),
    ("224.0.0.1", True),
    ("239.255.255.250", True),
    ("ff02::1", True),
    ("240.0.0.1", True),
    ("255.255.255.255", True),
    ("100::1", True),  # discard-only
    ("100.100.100.200", True),  # Alibaba metadata
    ("fd00:ec2::254", True),  # AWS metadata over IPv6
    ("::ffff:169.254.169.254", True),
    ("2002:a9fe:a9fe::1", True),  # 6to4 of 169.254.169.254
    ("::a00:1", True),  # deprecated IPv4-compatible
    ("64:ff9b:1::a9fe:a9fe", True),  # local-use NAT64 of 169.254.169.254: refused even with allow_private
]


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses(ip):
    assert is_public_address(ip)
    assert address_allowed(ip, allow_private=False)
    assert address_allowed(ipaddress.ip_address(ip), allow_private=False)


@pytest.mark.parametrize(("ip", "always"), NOT_PUBLIC)
def test_non_public_addresses(ip, always):
    assert not is_public_address(ip)
    assert not address_allowed(ip, allow_private=False)
    assert address_allowed(ip, allow_private=True) is (not always)


def test_documentation_ranges_are_an_explicit_decision():
    # ipaddress marks them private / non-global; the guard deliberately does not.
    for ip in ("192.0.2.1", "198.51.100.7", "203.0.113.5", "2001:db8::1"):
        assert ipaddress.ip_address(ip).is_private and not ipaddress.ip_address(ip).is_global
        assert is_public_address(ip)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("167772161", "10.0.0.1"),
        ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1"),
        ("8.8.8.8", "8.8.8.8"),
        ("example.com", None),
        ("1example.com", None),
        ("0x7f.example", None),
        ("", None),
    ],
)
def test_parse_ip_host_notations(host, expected):
    got = parse_ip_host(host)
    assert (str(got) if got is not None else None) == expected


def _reason(url, allow_private=False):
    with pytest.raises(RefusedURL) as info:
        check_url(url, allow_private)
    assert info.value.message and str(info.value) == info.value.message
    return info.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/x.jpg",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://127.0.0.1./",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]:80/",
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/latest/meta-data/",  # 169.254.169.254 in decimal
        "http://[fe80::1%25eth0]/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.0.1/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://0/",
        "http://[::]/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://198.18.0.1/",
        "http://192.0.0.1/",
        "http://[fd00::1]/",
        "https://localhost/",
        "http://LOCALHOST./",
        "http://images.localhost/a.png",
    ],
)
def test_check_url_refuses_internal_addresses(url):
    assert _reason(url) == "refused_address"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "gopher://example.com/",
        "ws://example.com/",
        "FILE:///etc/passwd",
    ],
)
def test_check_url_refuses_schemes_even_with_allow_private(url):
    assert _reason(url) == "refused_scheme"
    assert _reason(url, allow_private=True) == "refused_scheme"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "not a url",
        "//example.com/x.jpg",
        "http://",
        "http:///x.jpg",
        "http://user:pw@example.com/x.jpg",
        "http://user@example.com/x.jpg",
        "http://example.com:99999/",
        "http://1.2.3.4.5/",
        "http://[zz::1]/",
        "http://exa mple.com/",
        "http://a..b/",
        "http://a%2fb/",
    ],
)
def test_check_url_invalid(url):
    assert _reason(url) == "invalid_url"


@pytest.mark.parametrize("allow_private", [False, True])
def test_check_url_refuses_overlong_host_names(allow_private):
    label63, label64 = "a" * 63, "a" * 64
    long_name = ".".join([label63] * 4)  # 255 octets
    for host in (f"{label64}.example.org", f"{label64}.com.", f"x.{label64}", long_name, long_name + "."):
        assert _reason(f"http://{host}/x.jpg", allow_private) == "invalid_url", host
    with pytest.raises(RefusedURL, match="too long"):
        check_url(f"http://{label64}.example.org/x.jpg", allow_private)
    assert _reason("http://" + "\u00e4" * 64 + ".com/", allow_private) == "invalid_url"  # too long once IDNA-encoded
    for host in (f"{label63}.com", f"{label63}.com.", ".".join([label63] * 3 + ["a" * 61])):  # at the limits
        check_url(f"http://{host}/x.jpg", allow_private)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.jpg",
        "HTTPS://Example.COM/a.jpg?x=1#frag",
        "http://8.8.8.8/",
        "https://198.51.100.7:8443/x",
        "http://[2001:db8::1]:8080/",
        "http://[2606:4700::1111]/",
        "http://xn--exmple-cua.com/",
        "http://ex\u00e4mple.com/",
    ],
)
def test_check_url_accepts_public(url):
    check_url(url, allow_private=False)


def test_allow_private_opens_loopback_and_private_but_not_metadata():
    for url in ("http://127.0.0.1:8000/", "http://localhost:8000/", "http://10.0.0.1/", "http://[::1]/"):
        check_url(url, allow_private=True)
    for url in ("http://169.254.169.254/", "http://[fe80::1]/", "http://0.0.0.0/", "http://255.255.255.255/"):
        assert _reason(url, allow_private=True) == "refused_address"


class FakeResolver(AbstractResolver):
    """Answers from a table; never touches the network."""

    def __init__(self, table):
        self.table = table
        self.closed = False

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        return [
            {"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for ip in self.table[host]
        ]

    async def close(self):
        self.closed = True


def _resolve(host, allow_private=False):
    inner = FakeResolver(
        {
            "good.test": ["198.51.100.7", "8.8.8.8"],
            "evil.test": ["10.0.0.1"],
            "mixed.test": ["8.8.8.8", "127.0.0.1"],
            "meta.test": ["169.254.169.254"],
            "empty.test": [],
        }
    )

    async def go():
        guard = GuardedResolver(allow_private, inner)
        try:
            return await guard.resolve(host, 80)
        finally:
            await guard.close()
            assert inner.closed

    return asyncio.run(go())


def test_guarded_resolver_passes_public_answers():
    assert [r["host"] for r in _resolve("good.test")] == ["198.51.100.7", "8.8.8.8"]


@pytest.mark.parametrize("host", ["evil.test", "mixed.test", "meta.test"])
def test_guarded_resolver_refuses_any_non_public_answer(host):
    with pytest.raises(AddressRefused, match="non-public"):
        _resolve(host)


def test_guarded_resolver_with_allow_private():
    assert [r["host"] for r in _resolve("mixed.test", allow_private=True)] == ["8.8.8.8", "127.0.0.1"]
    with pytest.raises(AddressRefused):
        _resolve("meta.test", allow_private=True)


@pytest.mark.parametrize("host", ["nxdomain.test", "empty.test"])
def test_guarded_resolver_lookup_failures(host):
    with pytest.raises(NameLookupError):
        _resolve(host)


@pytest.mark.parametrize("exc", [UnicodeError("label empty or too long"), ValueError("embedded null character")])
def test_guarded_resolver_turns_encoding_errors_into_lookup_failures(exc):
    class Raising(FakeResolver):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            raise exc

    async def go():
        return await GuardedResolver(False, Raising({})).resolve("a" * 64 + ".example.org", 80)

    with pytest.raises(NameLookupError, match="cannot resolve"):
        asyncio.run(go())


@pytest.mark.parametrize("host", ["shop.invalid", "cdn.shop.INVALID.", "a.test", "www.example", "printer.local"])
def test_reserved_names_fail_without_any_lookup(host, monkeypatch):
    from pipeline.netguard import GuardedResolver, NameLookupError, is_reserved_name

    def boom(*a, **k):
        raise AssertionError("a reserved name reached the system resolver")

    monkeypatch.setattr(socket, "getaddrinfo", boom)
    assert is_reserved_name(host)
    with pytest.raises(NameLookupError, match="reserved"):
        asyncio.run(GuardedResolver(allow_private=True).resolve(host, 80))


def test_ordinary_names_are_not_reserved():
    from pipeline.netguard import is_reserved_name

    assert not is_reserved_name("example.com") and not is_reserved_name("invalid.org")
