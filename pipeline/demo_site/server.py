"""Serve the demo site over HTTP/1.1 (keep-alive, threaded) on a loopback address, in a background thread."""

from __future__ import annotations

import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.demo_site.site import DemoSite, DemoSiteConfig, Response, build_site, write_ground_truth


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "altforge-demo-site/1"
    sys_version = ""
    timeout = 30  # seconds an idle keep-alive connection may stay open

    def do_GET(self):  # noqa: N802 (http.server naming)
        self._reply(send_body=True)

    def do_HEAD(self):  # noqa: N802
        self._reply(send_body=False)

    def _reply(self, send_body: bool) -> None:
        target = self.path
        if not target.startswith("/"):  # absolute-form request target
            parts = urlsplit(target)
            target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        try:
            resp = self.server.site.respond(target, self.server.origin)
        except Exception as e:  # a bug must not kill the connection thread silently
            resp = Response(500, "text/plain; charset=utf-8", f"internal error: {type(e).__name__}\n".encode())
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for name, value in resp.headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(resp.body)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format, *args):  # quiet: a scraper makes thousands of requests
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address, site: DemoSite):
        self.site = site
        self.origin = ""
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address):
        pass  # clients that hang up mid-response (ConnectionResetError, BrokenPipeError) are normal here


class _Server6(_Server):
    address_family = socket.AF_INET6


def loopback_host(host: str) -> str:
    """Return ``host`` as a loopback IP literal, or raise ValueError (the demo site never binds elsewhere)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"demo site binds only to a loopback address (127.0.0.1, ::1), got {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"demo site binds only to a loopback address (127.0.0.1, ::1), got {host!r}")
    return str(ip)


class DemoSiteServer:
    """The demo site served from a background thread; use as a context manager or call start()/shutdown()."""

    def __init__(self, site: DemoSite, host: str = "127.0.0.1", port: int = 0):
        self.site = site
        self.host = loopback_host(host)
        self._requested_port = port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (known after start())."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def origin(self) -> str:
        """Scheme, host and port without a trailing slash, e.g. "http://127.0.0.1:8000"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The site's root URL, e.g. "http://127.0.0.1:8000/"."""
        return self.origin + "/"

    def start(self) -> DemoSiteServer:
        """Bind and start serving in a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        cls = _Server6 if ":" in self.host else _Server
        self._httpd = cls((self.host, self._requested_port), self.site)
        self._httpd.origin = self.origin
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-site", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def wait(self, timeout: float | None = None) -> None:
        """Block until the server stops (for a foreground CLI command)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def ground_truth_rows(self) -> list[dict]:
        """Ground-truth rows with URLs on this server."""
        return self.site.ground_truth_rows(self.url)

    def write_ground_truth(self, path: str | Path) -> int:
        """Write this server's ground truth as JSONL; returns the number of rows."""
        return write_ground_truth(self.site, path, self.url)

    def __enter__(self) -> DemoSiteServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(cfg: DemoSiteConfig | DemoSite | None = None, host: str = "127.0.0.1", port: int = 0) -> DemoSiteServer:
    """Build the site (if given a config) and return a started server on ``host``:``port`` (0 = any free port)."""
    loopback_host(host)  # fail before building anything
    site = cfg if isinstance(cfg, DemoSite) else build_site(cfg or DemoSiteConfig())
    return DemoSiteServer(site, host, port).start()
