"""A Fetcher on its own event-loop thread, so synchronous stage code overlaps downloads with CPU work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from pipeline.fetch import FetchConfig, Fetcher, FetchResult


class BackgroundFetcher:
    """Runs an async :class:`Fetcher` on a daemon thread; ``submit`` returns a ``concurrent.futures.Future``.

    Create one per worker process and reuse it for every shard: connections, DNS and robots.txt caches live on.
    """

    def __init__(self, cfg: FetchConfig, resolver=None):
        self.cfg = cfg
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="altforge-fetch", daemon=True)
        self._thread.start()
        self._fetcher: Fetcher = asyncio.run_coroutine_threadsafe(self._open(resolver), self._loop).result()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _open(self, resolver) -> Fetcher:
        return await Fetcher(self.cfg, resolver=resolver).__aenter__()

    def submit(self, url: str, kind: str = "image") -> concurrent.futures.Future[FetchResult]:
        """Start fetching ``url``; the future's result is a FetchResult (never an exception for network faults)."""
        return asyncio.run_coroutine_threadsafe(self._fetcher.fetch(url, kind), self._loop)

    def fetch(self, url: str, kind: str = "image") -> FetchResult:
        """Fetch one URL and wait for it."""
        return self.submit(url, kind).result()

    def run(self, coro_fn, *args):
        """Run ``coro_fn(fetcher, *args)`` on the fetch loop and wait for its result (e.g. a crawl)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(self._fetcher, *args), self._loop).result()

    def close(self) -> None:
        """Close connections and stop the loop thread."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._fetcher.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> BackgroundFetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
