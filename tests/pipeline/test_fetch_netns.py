"""End-to-end refusals inside an isolated network namespace (``unshare -n``): nothing can leave this machine.

The script below runs in a fresh namespace that has only a loopback device. It gives ``lo`` a documentation
address (198.51.100.7, public to the guard) and the internal addresses an attacker would aim at (10.0.0.1,
169.254.169.254), runs a BadServer on each, and fetches with ``allow_private_network=False``. Every internal
server must see zero requests, which a control request made before proves it would have seen.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import netns_unavailable

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import asyncio, json, socket, subprocess, sys, urllib.request
sys.path.insert(0, sys.argv[1])

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for cidr in ("198.51.100.7/32", "10.0.0.1/32", "169.254.169.254/32"):
    subprocess.run(["ip", "addr", "add", cidr, "dev", "lo"], check=True)

from aiohttp.abc import AbstractResolver
from pipeline.fetch import FetchConfig, Fetcher
from tests.pipeline.badserver import BadServer


class TableResolver(AbstractResolver):
    def __init__(self, table):
        self.table = table

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host not in self.table:
            raise OSError(-2, "Name or service not known")
        return [{"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
                for ip in self.table[host]]

    async def close(self):
        pass


public = BadServer("198.51.100.7").start()
internal = {name: BadServer(host).start()
            for name, host in (("loopback", "127.0.0.1"), ("private", "10.0.0.1"), ("metadata", "169.254.169.254"))}
loop_url = internal["loopback"].url("/ok.png")
private_url = internal["private"].url("/ok.png")
meta_url = internal["metadata"].url("/latest/meta-data/")
evil_url = f"http://evil.test:{internal['private'].port}/ok.png"

# Control: each internal server is reachable from here, so a guard that let a request through would be seen.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
control = {name: opener.open(srv.url("/ok.png"), timeout=5).status for name, srv in internal.items()}
for srv in internal.values():
    srv.reset_stats()

resolver = TableResolver({
    "good.test": ["198.51.100.7"],
    "evil.test": ["10.0.0.1"],
    "mixed.test": ["198.51.100.7", "10.0.0.1"],
    "meta.test": ["169.254.169.254"],
})
cases = {
    "public_image": public.url("/ok.png"),
    "public_name": f"http://good.test:{public.port}/ok.png",
    "direct_metadata": meta_url,
    "direct_private": private_url,
    "direct_loopback": loop_url,
    "direct_decimal_private": f"http://167772161:{internal['private'].port}/ok.png",
    "direct_ipv6_loopback": f"http://[::1]:{internal['loopback'].port}/ok.png",
    "name_to_private": evil_url,
    "name_to_mixed": f"http://mixed.test:{internal['private'].port}/ok.png",
    "name_to_metadata": f"http://meta.test:{internal['metadata'].port}/latest/meta-data/",
    "redirect_to_loopback": public.url("/redirect?to=" + loop_url),
    "redirect_to_metadata": public.url("/redirect?to=" + meta_url),
    "redirect_to_private": public.url("/redirect?to=" + private_url),
    "redirect_to_name_to_private": public.url("/redirect?to=" + evil_url),
    "redirect_to_localhost": public.url(f"/redirect?to=http://localhost:{internal['loopback'].port}/ok.png"),
}
long_host = "a" * 64 + ".example.org"
long_names = {  # fetched with the system resolver: getaddrinfo would raise UnicodeError on these names
    "direct_long_label": f"http://{long_host}/x.jpg",
    "redirect_to_long_label": public.url(f"/redirect?to=http://{long_host}/x.jpg"),
}


async def main():
    cfg = FetchConfig(allow_private_network=False, connect_timeout=1, read_timeout=1, total_timeout=3, backoff=0.01)
    async with Fetcher(cfg, resolver=resolver) as f:
        results = await asyncio.gather(*(f.fetch(u) for u in cases.values()))
    return {name: {"status": r.status, "error": r.error, "body": len(r.body or b"")}
            for name, r in zip(cases, results)}


async def system_resolver():
    cfg = FetchConfig(allow_private_network=False, connect_timeout=1, read_timeout=1, total_timeout=3, retries=0)
    async with Fetcher(cfg) as f:
        results = [await f.fetch(u) for u in long_names.values()]
    return {name: {"status": r.status, "error": r.error} for name, r in zip(long_names, results)}


out = {
    "results": asyncio.run(main()),
    "redirects_served_before": public.hits("/redirect"),
    "long_names": asyncio.run(system_resolver()),
    "control": control,
    "internal_hits": {name: srv.hits() for name, srv in internal.items()},
    "redirects_served": public.hits("/redirect"),
    "public_ok_hits": public.hits("/ok.png"),
}
public.stop()
for srv in internal.values():
    srv.stop()
print(json.dumps(out))
"""


def run_isolated(script: str, tmp_path, timeout: int) -> dict:
    """Run ``script`` in a fresh network namespace (``unshare -n``); its last stdout line, as JSON."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    path = tmp_path / "netns_script.py"
    path.write_text(script)
    done = subprocess.run(
        ["unshare", "-n", sys.executable, str(path), str(REPO)], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.netns
def test_guard_end_to_end_in_isolated_namespace(tmp_path):
    out = run_isolated(SCRIPT, tmp_path, timeout=60)
    results = out["results"]

    assert out["control"] == {"loopback": 200, "private": 200, "metadata": 200}
    assert results["public_image"]["status"] == "success" and results["public_image"]["body"] > 0
    assert results["public_name"]["status"] == "success"
    assert out["public_ok_hits"] == 2

    refused = {name: r["status"] for name, r in results.items() if not name.startswith("public")}
    assert refused == dict.fromkeys(refused, "refused_address"), results
    for name in ("name_to_private", "name_to_mixed", "name_to_metadata", "redirect_to_name_to_private"):
        assert "resolves to non-public address" in results[name]["error"], results[name]

    assert out["redirects_served_before"] == 5  # each redirect was answered by the public server ...
    assert out["internal_hits"] == {"loopback": 0, "private": 0, "metadata": 0}  # ... and nothing followed it

    long_names = out["long_names"]  # refused by the URL guard: the UnicodeError of getaddrinfo is never reached
    statuses = {name: r["status"] for name, r in long_names.items()}
    assert statuses == dict.fromkeys(long_names, "invalid_url"), long_names
    assert all("too long" in r["error"] for r in long_names.values()) and out["redirects_served"] == 6


INPUT_SCRIPT = r"""
import asyncio, io, json, os, subprocess, sys, tempfile, threading, urllib.request
from collections import Counter
sys.path.insert(0, sys.argv[1])

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for cidr in ("198.51.100.7/32", "10.0.0.1/32", "169.254.169.254/32"):
    subprocess.run(["ip", "addr", "add", cidr, "dev", "lo"], check=True)

from aiohttp import web
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter
from pipeline.sources.url_list import iter_url_list
from pipeline.sources.warc import iter_warc


class Files:
    # A file server with HEAD and ranges (what fsspec's HTTP reader uses) that logs every request.
    def __init__(self, host, files, redirects=None):
        self.log, self.redirects, self.dir = [], redirects or {}, tempfile.mkdtemp()
        for name, body in files.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(body)
        ready = threading.Event()

        async def handler(req):
            self.log.append(req.path)
            name = req.path.lstrip("/")
            if name in self.redirects:
                raise web.HTTPFound(self.redirects[name])
            path = os.path.join(self.dir, name)
            if os.path.isfile(path):
                return web.FileResponse(path)
            raise web.HTTPNotFound()

        def run():
            loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, host, 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait()
        self.host = host

    def url(self, name):
        return f"http://{self.host}:{self.port}/{name}"


buf = io.BytesIO()
writer = WARCWriter(buf, gzip=True)
page = b'<html><body><img src="http://img.example.org/x.jpg" alt="a red square on a wooden table"></body></html>'
headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
writer.write_record(writer.create_warc_record("http://page.example.org/", "response", payload=io.BytesIO(page),
                                              http_headers=headers))
files = {"list.txt": b"http://img.example.org/a.jpg\n", "a.warc.gz": buf.getvalue()}
meta = Files("169.254.169.254", files)
private = Files("10.0.0.1", files)
public = Files("198.51.100.7", files, {"to-meta-list.txt": meta.url("list.txt"),
                                       "to-meta.warc.gz": meta.url("a.warc.gz"),
                                       "to-private-list.txt": private.url("list.txt"),
                                       "to-localhost-list.txt": "http://localhost:1/list.txt"})

# Control: the internal servers answer from here, so a read that reached them would show in their logs.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
control = [opener.open(srv.url("list.txt"), timeout=5).status for srv in (meta, private)]
meta.log.clear()
private.log.clear()


def read(kind, url, allow_private=False):
    try:
        if kind == "list":
            return [r.url for r in iter_url_list(url, drops=Counter(), allow_private=allow_private)]
        return [r.url for r in iter_warc(url, Counter(), allow_private=allow_private)]
    except ValueError as exc:
        return "error: " + str(exc)


out = {
    "public_list": read("list", public.url("list.txt")),
    "public_warc": read("warc", public.url("a.warc.gz")),
    "redirect_list_to_metadata": read("list", public.url("to-meta-list.txt")),
    "redirect_warc_to_metadata": read("warc", public.url("to-meta.warc.gz")),
    "redirect_list_to_private": read("list", public.url("to-private-list.txt")),
    "redirect_list_to_localhost": read("list", public.url("to-localhost-list.txt")),
    "direct_metadata": read("warc", meta.url("a.warc.gz")),
    "direct_private": read("list", private.url("list.txt")),
    "metadata_hits_refused": len(meta.log),
    "private_hits_refused": len(private.log),
    "allowed_redirect_to_private": read("list", public.url("to-private-list.txt"), allow_private=True),
    "allowed_redirect_to_metadata": read("list", public.url("to-meta-list.txt"), allow_private=True),
    "control": control,
    "metadata_hits": len(meta.log),
    "private_hits": len(private.log),
}
print(json.dumps(out))
"""


@pytest.mark.netns
def test_remote_input_files_are_read_under_the_guard(tmp_path):
    """URL lists and WARCs given as http(s) URLs: a redirect into link-local or private space is refused, in one
    line, before any request reaches it (the metadata server is refused even with allow_private)."""
    out = run_isolated(INPUT_SCRIPT, tmp_path, timeout=120)

    assert out["control"] == [200, 200]
    assert out["public_list"] == ["http://img.example.org/a.jpg"]
    assert out["public_warc"] == ["http://img.example.org/x.jpg"]
    for name in ("redirect_list_to_metadata", "redirect_warc_to_metadata", "redirect_list_to_private"):
        assert (
            out[name].startswith("error: input http://198.51.100.7:")
            and "redirect refused (refused_address)" in (out[name])
        ), out[name]
    assert "redirect refused (refused_address): host 'localhost' is local" in out["redirect_list_to_localhost"]
    assert "refused (refused_address): address 169.254.169.254 is not public" in out["direct_metadata"]
    assert "refused (refused_address): address 10.0.0.1 is not public" in out["direct_private"]
    assert out["metadata_hits_refused"] == 0 and out["private_hits_refused"] == 0

    assert out["allowed_redirect_to_private"] == ["http://img.example.org/a.jpg"]
    assert "redirect refused (refused_address): address 169.254.169.254" in out["allowed_redirect_to_metadata"]
    assert out["private_hits"] > 0 and out["metadata_hits"] == 0
