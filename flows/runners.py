"""Where a stage's per-shard tasks run (threads + the stage's process pool, or an existing Dask cluster), and the
checks that make a recipe fail at the start with one line rather than halfway through."""

from __future__ import annotations

from dataclasses import dataclass

from flows import env  # noqa: F401  (before prefect)
from pipeline import storage


@dataclass(frozen=True)
class Placement:
    """How a stage runs its per-shard tasks."""

    kind: str = "local"  # "local": Prefect threads hand the CPU work to the stage's own process pool
    # "process": Prefect's ProcessPoolTaskRunner; "dask": an existing Dask cluster through prefect-dask
    dask_address: str | None = None  # tcp://host:port of the Dask scheduler
    max_workers: int = 2  # concurrent shard tasks (the per-stage concurrency limit)

    def task_runner(self, processes: int):
        """The Prefect task runner for a stage that wants ``processes`` CPU workers on one machine."""
        from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

        if self.kind == "dask":
            from prefect_dask import DaskTaskRunner

            return DaskTaskRunner(address=self.dask_address)
        if self.kind == "process":
            return ProcessPoolTaskRunner(max_workers=max(1, processes))
        return ThreadPoolTaskRunner(max_workers=max(1, processes, self.max_workers))

    def worker_processes(self, processes: int) -> int:
        """Processes each task may spawn: only the local runner adds a pool; Dask and process workers work inline."""
        return processes if self.kind == "local" else 1


def placement_of(runtime, dask_address: str | None = None) -> Placement:
    """The placement a recipe's ``runtime`` section asks for (``dask_address`` from the CLI overrides it)."""
    if dask_address:
        return Placement("dask", dask_address, runtime.max_workers if runtime else 2)
    if runtime is None:
        return Placement()
    return Placement(runtime.task_runner, runtime.dask_address, runtime.max_workers)


def check_dask(address: str, timeout_s: float = 10.0) -> None:
    """Raise ``RuntimeError`` (one line) unless a Dask scheduler answers at ``address``."""
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:  # before Client(): a half-built client hangs for 20 s in __del__ at exit
        scheme, loc = parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(loc)
    except ValueError as e:
        raise RuntimeError(f"Dask scheduler address {address!r}: {str(e).splitlines()[0]}") from None
    n = dask_worker_count(address, timeout_s)
    if n == 0:
        raise RuntimeError(f"Dask scheduler {address} has no workers")


def dask_worker_count(address: str, timeout_s: float = 10.0) -> int:
    """The worker processes of the Dask cluster at ``address`` (each keeps its own fetcher, so a per-host limit is
    shared out over them); ``RuntimeError`` (one line) when it cannot be reached."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout_s, set_as_default=False) as client:
            return len(client.scheduler_info(n_workers=-1).get("workers", {}))
    except Exception as e:  # OSError/TimeoutError when down, and whatever else a client raises: one line
        why = (str(e) or type(e).__name__).splitlines()[0]
        raise RuntimeError(f"Dask scheduler {address} is unreachable: {why}") from None


# s3fs options for the bucket check: an endpoint that accepts connections and never answers fails in seconds,
# not after botocore's and s3fs's retries (14 minutes measured); the user's own config_kwargs win.
CHECK_TIMEOUTS = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 20, "retries": {"total_max_attempts": 1}}}


def check_output(url: str, storage_options: dict | None = None) -> None:
    """Raise ``RuntimeError`` (one line) when the output is blank or padded with whitespace, or an object-store
    output's bucket is missing or not accessible."""
    if url != url.strip() or not url:
        raise RuntimeError(f"output {url!r}: blank or padded with whitespace; write the path without it")
    if storage.is_local(url):
        return
    try:
        fs, _ = storage.get_fs(url, storage_options)
    except ValueError as e:  # an unknown scheme, or its package is missing
        raise RuntimeError(str(e)) from None
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    try:
        if hasattr(fs, "call_s3"):  # s3fs's exists() answers False for any error, after minutes on a hung endpoint
            fs = type(fs)(**{**CHECK_TIMEOUTS, **(storage_options or {})}, skip_instance_cache=True)
            fs.retries = 1  # s3fs's own retries, on top of botocore's
            fs.call_s3("head_bucket", Bucket=bucket)
            return
        ok = fs.exists(bucket)
    except FileNotFoundError:
        ok = False
    except Exception as e:  # botocore/aiohttp errors vary by cause; the first line says which
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise RuntimeError(f"{url}: cannot reach the bucket {bucket!r}: {why}") from None
    if not ok:
        raise RuntimeError(f"{url}: bucket {bucket!r} does not exist or is not accessible with these credentials")


def check_manifest(
    url: str, storage_options: dict | None = None, what: str = "dataset", versioned: bool = False
) -> None:
    """Raise ``RuntimeError`` (one line) unless a finished dataset (its manifest.json) is at ``url`` (or, with
    ``versioned``, a versioned root with a complete version)."""
    try:
        _check_manifest(url, storage_options, what, versioned)
    except ValueError as e:  # a scheme without its filesystem (gs:// without gcsfs) or an unknown one
        raise RuntimeError(f"{what} {e}" if str(e).startswith(url) else f"{what} {url}: {e}") from None


def _check_manifest(url: str, storage_options: dict | None, what: str, versioned: bool) -> None:
    if versioned and not url.endswith(".json"):
        from pipeline import versions

        if versions.is_versioned(url, storage_options):
            try:
                versions.resolve(url, None, storage_options)
            except FileNotFoundError as e:
                raise RuntimeError(f"{what} {url}: {e}") from None
            return
    manifest = url if url.endswith(".json") else storage.join(url, "manifest.json")
    if not storage.exists(manifest, storage_options):
        raise RuntimeError(f"{what} {url}: no manifest.json there (not a finished altforge dataset)")


def wait_for_shards(futures: dict, stage: str, what: str = "shard(s)") -> None:
    """Wait for per-shard task futures ({name: future}), with a progress artifact and log line per finished shard.

    Raises ``RuntimeError`` naming the failed shards (after every other shard has finished, so a rerun resumes).
    """
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    log = get_run_logger()
    total = max(1, len(futures))
    progress = create_progress_artifact(0.0, description=f"{stage}: {what} done")
    failed = []
    for done, (name, fut) in enumerate(futures.items(), start=1):
        fut.wait()
        if not fut.state.is_completed():
            failed.append(f"{name} ({fut.state.message or fut.state.name})")
        update_progress_artifact(progress, 100.0 * done / total)
        log.info("%s: %d/%d %s finished (%s)", stage, done, total, what, name)
    if failed:
        raise RuntimeError(f"{len(failed)} {what} failed; rerun to resume: {', '.join(failed[:5])}")
