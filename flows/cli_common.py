"""What every ``altforge`` command shares: one-line failures and running a flow with a live progress display."""

from __future__ import annotations

import typer

from flows import env  # noqa: F401  (telemetry off before anything imports prefect)

STORAGE_OPTIONS_HELP = 'fsspec options for s3:// (or other) paths, as JSON: \'{"endpoint_url": "https://..."}\''


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options`` JSON as a dict (None when not given); a one-line failure when it is not a JSON object."""
    if not text:
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--storage-options: not JSON ({e.msg} at column {e.colno})")
    if not isinstance(value, dict):
        fail(f"--storage-options: give a JSON object, not {type(value).__name__}")
    return value


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def run_flow(title: str, fn, *args, progress: bool = True, **kwargs):
    """Run a flow (with a live display fed by the stage workers when ``progress``); one-line error on failure."""
    import contextlib

    from flows import tempserver, workers
    from flows.progress import ProgressDisplay

    try:
        tempserver.wait()  # a flow's client must not find the server half-started
    except tempserver.ServerStartError as e:
        fail(str(e), code=1)
    with ProgressDisplay(title) if progress else contextlib.nullcontext() as display:
        workers.set_progress_queue(display.queue if display else None)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the flow's own message is the one line a user needs
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fail(f"{title} failed: {first}", code=1)
        finally:
            workers.set_progress_queue(None)
