"""A real threaded HTTP server on a local address whose routes misbehave on purpose, for fetcher tests.

It only ever answers: it never opens a connection itself. Use it as a context manager::

    with BadServer() as srv:                     # 127.0.0.1, a free port
        url = srv.url("/stall?s=5")
        ...
        assert srv.hits("/flaky") == 3           # requests per path (query ignored unless given)
        srv.max_in_flight                        # most requests handled at once
        srv.log                                  # every request: time, path, headers

Built-in routes (custom ones from :meth:`BadServer.route` / :meth:`BadServer.add` take precedence):

=============================  ==================================================================================
``/ok.png``                    a valid tiny PNG (image/png)
``/page.html``                 a small HTML page with an ``<img alt=...>``
``/latin1.html``               an ISO-8859-1 page (not UTF-8), charset given in Content-Type
``/no-content-type.png``       the PNG without a Content-Type header
``/wrong-content-type.png``    the PNG labelled text/plain
``/html-as-image.jpg``         an HTML body labelled image/jpeg
``/slow?s=2``                  sleeps ``s`` seconds before the headers, then the PNG (alias ``/slow-headers``)
``/stall?s=30``                headers and half the body, then sleeps ``s`` seconds and closes
``/drip``                       a 1000-byte body, one byte every 50 ms: never stalls, takes 50 s in all
``/reset``                     headers and part of the body, then a TCP RST (SO_LINGER 0)
``/reset-before-headers``      a TCP RST before any response byte
``/huge?mb=100``               ``mb`` MB with Content-Length, generated lazily (see :meth:`BadServer.bytes_sent`)
``/huge-chunked?mb=100``       the same, chunked, without Content-Length
``/loop/a``, ``/loop/b``       redirect to each other; ``/self-redirect`` redirects to itself
``/chain/N``                   redirects to ``/chain/N-1`` ... ``/chain/0``, which serves the PNG
``/redirect?to=URL&code=302``  redirects anywhere (relative or absolute ``to``)
``/redirect-loopback``         redirects to ``http://127.0.0.1:<this port>/ok.png``
``/redirect-metadata``         redirects to ``http://169.254.169.254/latest/meta-data/``
``/status/CODE``               answers with that status code
``/flaky?fail=2``              503 for the first ``fail`` requests (per full path+query), then the PNG
``/flaky-reset?fail=2``        a TCP RST for the first ``fail`` requests, then the PNG
``/retry-after?s=1&code=429``  ``code`` with ``Retry-After: s`` the first time (per full path+query), then the PNG
``/noai.png``                  the PNG with ``X-Robots-Tag: noai``
``/noimageai.png``             ... ``X-Robots-Tag: noimageai``
``/ua-noai.png``               ... ``X-Robots-Tag: altforge: noai``
``/other-noai.png``            ... ``X-Robots-Tag: otherbot: noai`` (not an opt-out for altforge)
``/multi-xrt.png``             ... two headers: ``googlebot: noindex`` and ``NOIMAGEAI``
``/private/...``               the PNG (for robots.txt disallow tests)
``/robots.txt``                404 unless set with :meth:`BadServer.set_robots` (see ``ROBOTS_*`` constants)
anything else                  404
=============================  ==================================================================================
"""

from __future__ import annotations

import io
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ROBOTS_DISALLOW_PRIVATE = b"User-agent: *\nDisallow: /private\n"
ROBOTS_MALFORMED = (
    b"\xef\xbb\xbfthis line is junk\n"
    b"Disallow: /before-any-group\n"
    b"User-agent: *\n"
    b"Disallow /no-colon\n"
    b": no key\n"
    b"Crawl-delay: not-a-number\n"
    b"Disallow: /private   # a comment\n"
    b"Allow: /private/ok\n"
    b"\xff\xfe\x00 binary garbage \x80\x81\n"
    b"Disallow: /caf\xe9\n"
)
ROBOTS_DISALLOW_ALTFORGE = b"User-agent: otherbot\nDisallow:\n\nUser-agent: AltForge/1.0\nDisallow: /\n"


def tiny_png(width: int = 1, height: int = 1, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A valid solid-colour RGB PNG, built with zlib only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(rgb) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b"")
    )


PNG = tiny_png()
PAGE_HTML = b'<!doctype html><html><body><img src="/ok.png" alt="a red square"></body></html>'
LATIN1_HTML = '<html><body><img src="/ok.png" alt="caf\u00e9 cr\u00e8me"></body></html>'.encode("latin-1")
_FILL = b"x" * 65536


@dataclass
class Request:
    """One request the server received."""

    time: float  # time.monotonic() on arrival
    method: str
    target: str  # path + query as sent
    path: str
    headers: dict[str, str]  # lower-case names
    client: tuple  # the client's (address, port): one per connection, so keep-alive reuse shows


@dataclass
class Exchange:
    """One request as a route sees it, with ways to answer it well or badly."""

    server: BadServer
    handler: BaseHTTPRequestHandler
    request: Request
    query: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The request path without the query."""
        return self.request.path

    def arg(self, name: str, default: float) -> float:
        """A numeric query parameter."""
        return float(self.query.get(name, default))

    def start(self, status: int, headers: list[tuple[str, str]] | dict[str, str] = ()) -> None:
        """Send the status line and headers (add Content-Length yourself, or chunked, or close)."""
        h = self.handler
        h.send_response(status)
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            h.send_header(name, value)
        h.end_headers()

    def write(self, data: bytes) -> None:
        """Send raw bytes."""
        self.handler.wfile.write(data)
        self.server._count_sent(self.path, len(data))

    def respond(self, status: int = 200, body: bytes = b"", content_type: str | None = None, headers=()) -> None:
        """Send a complete, well-formed response."""
        hdrs = list(headers.items() if isinstance(headers, dict) else headers)
        if content_type:
            hdrs.append(("Content-Type", content_type))
        hdrs.append(("Content-Length", str(len(body))))
        self.start(status, hdrs)
        self.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        """Answer with a redirect to ``location``."""
        self.respond(status, b"", headers=[("Location", location)])

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early if the server stops; False if it stopped."""
        return not self.server._stopping.wait(seconds)

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0, then close)."""
        h = self.handler
        sock = h.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.rfile.close()  # drop makefile's reference so close() really closes the descriptor
        sock.close()
        h.rfile, h.wfile = io.BytesIO(), io.BytesIO()  # the handler flushes/closes these afterwards
        h.close_connection = True

    def close(self) -> None:
        """Close the connection after this response (FIN, not RST)."""
        self.handler.close_connection = True


Route = Callable[[Exchange], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "badserver/1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def setup(self):
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.owner._dispatch(self)

    do_HEAD = do_POST = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are business as usual here
            super().handle_error(request, client_address)


class BadServer:
    """A threaded HTTP/1.1 server on ``host`` (default 127.0.0.1), port 0, with misbehaving routes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self._requested_port = port
        self.port = 0
        self.log: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._counters: Counter = Counter()
        self._sent: Counter = Counter()
        self._routes: dict[str, Route] = {}
        self._prefix_routes: list[tuple[str, Route]] = []
        self._robots: tuple[int, bytes] = (404, b"not found")
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> BadServer:
        """Bind and serve in a background thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        self._httpd = server_cls((self.host, self._requested_port), _Handler)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping routes and drop open connections."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> BadServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- API -------------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """``http://host:port`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this server."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def route(self, path: str, fn: Route | None = None, prefix: bool = False):
        """Register ``fn(exchange)`` for ``path`` (or every path under it with ``prefix``); usable as decorator."""

        def register(f: Route) -> Route:
            if prefix:
                self._prefix_routes.insert(0, (path, f))
            else:
                self._routes[path] = f
            return f

        return register(fn) if fn is not None else register

    def add(self, path: str, body: bytes = b"", status: int = 200, content_type: str | None = None, headers=()):
        """Register a fixed response for ``path``."""
        self.route(path, lambda ex: ex.respond(status, body, content_type, headers))

    def set_robots(self, body: bytes = b"", status: int = 200) -> None:
        """What ``/robots.txt`` answers (status 404 / 500 for the missing / broken cases)."""
        self._robots = (status, body)

    def hits(self, path: str | None = None) -> int:
        """Requests received for ``path`` (compared with the query if ``path`` has one), or in all."""
        with self._lock:
            if path is None:
                return len(self.log)
            key = "target" if "?" in path else "path"
            return sum(1 for r in self.log if getattr(r, key) == path)

    def requests(self, path: str) -> list[Request]:
        """The logged requests for ``path`` (query ignored)."""
        with self._lock:
            return [r for r in self.log if r.path == path]

    def bytes_sent(self, path: str) -> int:
        """Body bytes handed to the kernel for ``path`` so far."""
        with self._lock:
            return self._sent[path]

    def in_flight(self) -> int:
        """Requests being handled right now."""
        with self._lock:
            return self._in_flight

    def reset_stats(self) -> None:
        """Forget the log, counters and in-flight maximum."""
        with self._lock:
            self.log.clear()
            self._counters.clear()
            self._sent.clear()
            self.max_in_flight = self._in_flight

    # -- internals -------------------------------------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _count_sent(self, path: str, n: int) -> None:
        with self._lock:
            self._sent[path] += n

    def _next_count(self, target: str) -> int:
        with self._lock:
            self._counters[target] += 1
            return self._counters[target]

    def _find(self, path: str) -> Route:
        if path in self._routes:
            return self._routes[path]
        for prefix, fn in self._prefix_routes:
            if path.startswith(prefix):
                return fn
        if path in _BUILTIN:
            return _BUILTIN[path]
        for prefix, fn in _BUILTIN_PREFIX:
            if path.startswith(prefix):
                return fn
        return _not_found

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        req = Request(
            time.monotonic(),
            handler.command,
            handler.path,
            parts.path,
            {k.lower(): v for k, v in handler.headers.items()},
            handler.client_address,
        )
        with self._lock:
            self.log.append(req)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            self._find(parts.path)(Exchange(self, handler, req, query))
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError, ValueError):
            handler.close_connection = True  # the client went away (or we reset it)
        finally:
            with self._lock:
                self._in_flight -= 1


# -- built-in routes ---------------------------------------------------------------------------------------------
def _not_found(ex: Exchange) -> None:
    ex.respond(404, b"not found", "text/plain")


def _png(ex: Exchange, headers=()) -> None:
    ex.respond(200, PNG, "image/png", headers)


def _slow(ex: Exchange) -> None:
    if ex.sleep(ex.arg("s", 2.0)):
        _png(ex)


def _stall(ex: Exchange) -> None:
    ex.start(200, [("Content-Type", "image/png"), ("Content-Length", str(2 * len(PNG)))])
    ex.write(PNG)
    ex.sleep(ex.arg("s", 30.0))
    ex.close()


def _drip(ex: Exchange) -> None:
    ex.start(200, [("Content-Type", "image/png"), ("Content-Length", "1000")])
    for _ in range(1000):
        ex.write(b"x")
        if not ex.sleep(0.05):
            break


def _reset(ex: Exchange) -> None:
    ex.start(200, [("Content-Type", "image/png"), ("Content-Length", "100000")])
    ex.write(_FILL[:1000])
    time.sleep(0.05)  # let the partial body reach the client first
    ex.reset()


def _huge(ex: Exchange) -> None:
    total = int(ex.arg("mb", 100) * 1_000_000)
    ex.start(200, [("Content-Type", "image/jpeg"), ("Content-Length", str(total))])
    sent = 0
    while sent < total and not ex.server._stopping.is_set():
        piece = _FILL[: min(len(_FILL), total - sent)]
        ex.write(piece)
        sent += len(piece)


def _huge_chunked(ex: Exchange) -> None:
    total = int(ex.arg("mb", 100) * 1_000_000)
    ex.start(200, [("Content-Type", "image/jpeg"), ("Transfer-Encoding", "chunked")])
    sent = 0
    while sent < total and not ex.server._stopping.is_set():
        piece = _FILL[: min(len(_FILL), total - sent)]
        ex.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sent += len(piece)
    ex.write(b"0\r\n\r\n")


def _chain(ex: Exchange) -> None:
    n = int(ex.path.rsplit("/", 1)[-1] or 0)
    if n <= 0:
        _png(ex)
    else:
        ex.redirect(f"/chain/{n - 1}")


def _redirect(ex: Exchange) -> None:
    ex.redirect(ex.query.get("to", "/ok.png"), int(ex.arg("code", 302)))


def _status(ex: Exchange) -> None:
    code = int(ex.path.rsplit("/", 1)[-1])
    ex.respond(code, f"status {code}".encode(), "text/plain")


def _flaky(ex: Exchange) -> None:
    if ex.server._next_count(ex.request.target) <= ex.arg("fail", 2):
        ex.respond(503, b"try again", "text/plain")
    else:
        _png(ex)


def _flaky_reset(ex: Exchange) -> None:
    if ex.server._next_count(ex.request.target) <= ex.arg("fail", 2):
        ex.reset()
    else:
        _png(ex)


def _retry_after(ex: Exchange) -> None:
    if ex.server._next_count(ex.request.target) == 1:
        seconds = ex.query.get("s", "1")
        ex.respond(int(ex.arg("code", 429)), b"slow down", "text/plain", [("Retry-After", seconds)])
    else:
        _png(ex)


def _robots(ex: Exchange) -> None:
    status, body = ex.server._robots
    ex.respond(status, body, "text/plain")


_BUILTIN: dict[str, Route] = {
    "/ok.png": _png,
    "/page.html": lambda ex: ex.respond(200, PAGE_HTML, "text/html; charset=utf-8"),
    "/latin1.html": lambda ex: ex.respond(200, LATIN1_HTML, "text/html; charset=iso-8859-1"),
    "/no-content-type.png": lambda ex: ex.respond(200, PNG),
    "/wrong-content-type.png": lambda ex: ex.respond(200, PNG, "text/plain"),
    "/html-as-image.jpg": lambda ex: ex.respond(200, PAGE_HTML, "image/jpeg"),
    "/slow": _slow,
    "/slow-headers": _slow,
    "/stall": _stall,
    "/drip": _drip,
    "/reset": _reset,
    "/reset-before-headers": lambda ex: ex.reset(),
    "/huge": _huge,
    "/huge-chunked": _huge_chunked,
    "/loop/a": lambda ex: ex.redirect("/loop/b"),
    "/loop/b": lambda ex: ex.redirect("/loop/a"),
    "/self-redirect": lambda ex: ex.redirect("/self-redirect", 301),
    "/redirect": _redirect,
    "/redirect-loopback": lambda ex: ex.redirect(f"http://127.0.0.1:{ex.server.port}/ok.png"),
    "/redirect-metadata": lambda ex: ex.redirect("http://169.254.169.254/latest/meta-data/"),
    "/flaky": _flaky,
    "/flaky-reset": _flaky_reset,
    "/retry-after": _retry_after,
    "/noai.png": lambda ex: _png(ex, [("X-Robots-Tag", "noai")]),
    "/noimageai.png": lambda ex: _png(ex, [("X-Robots-Tag", "noimageai")]),
    "/ua-noai.png": lambda ex: _png(ex, [("X-Robots-Tag", "altforge: noai")]),
    "/other-noai.png": lambda ex: _png(ex, [("X-Robots-Tag", "otherbot: noai")]),
    "/multi-xrt.png": lambda ex: _png(ex, [("X-Robots-Tag", "googlebot: noindex"), ("X-Robots-Tag", "NOIMAGEAI")]),
    "/robots.txt": _robots,
}
_BUILTIN_PREFIX: list[tuple[str, Route]] = [("/chain/", _chain), ("/status/", _status), ("/private/", _png)]
