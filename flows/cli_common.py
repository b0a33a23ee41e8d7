"""What every ``altforge`` command shares: one-line failures and running a flow with a live progress display."""

from __future__ import annotations

import typer

from flows import env  # noqa: F401  (telemetry off before anything imports prefect)

STORAGE_OPTIONS_HELP = 'fsspec options for s3:// (or other) paths, as JSON: \'{"endpoint_url": "https://..."}\''


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options`` JSON as a dict (None when not given); a one-line failure when it is not a JSON object."""
    from pipeline.storage import options_from_json

    try:
        return options_from_json(text)
    except ValueError as e:
        fail(str(e))


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # Prefect's loggers of one flow or task run
FAILURE_LOG = "last-failure.log"  # in PREFECT_HOME: the run-failure reports a command kept off the terminal


class RunFailureReports:
    """A console filter for a command's lifetime: Prefect's flow- and task-run error reports (with tracebacks) go to
    ``PREFECT_HOME/last-failure.log`` instead of the terminal, where the command prints its own one line.

    They still reach the Prefect server's run logs (the API handler is separate). Warnings stay on the terminal.
    """

    def __init__(self):
        self.records: list = []

    def filter(self, record) -> bool:
        if record.levelno >= 40 and record.name.startswith(RUN_LOGGERS):  # ERROR and above
            self.records.append(record)
            return False
        return True

    def __enter__(self) -> RunFailureReports:
        import logging

        from prefect.logging.handlers import PrefectConsoleHandler

        self.handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
        for h in self.handlers:
            h.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handlers:
            h.removeFilter(self)

    def line(self, exc: BaseException) -> str:
        """The one line for a failed command: the error's first line, and where the kept reports were written."""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log = self.write()
        return first + (f" (traceback: {log})" if log else "")

    def write(self) -> str | None:
        """Write the kept reports (message and traceback) to the failure log; its path, or None when there are none."""
        import logging
        import os

        if not self.records:
            return None
        home = os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")
        path = os.path.join(home, FAILURE_LOG)
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            os.makedirs(home, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(fmt.format(r) for r in self.records) + "\n")
        except OSError:
            return None
        return path


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def check_out(out: str, storage_options: dict | None) -> None:
    """One-line refusal of an ``--out`` the stage could not write: blank or padded, or an object-store bucket that
    is missing (it is never created) or that the endpoint and credentials cannot reach."""
    from flows.runners import check_output

    try:
        check_output(out, storage_options)
    except RuntimeError as e:
        fail(str(e))


def run_flow(title: str, fn, *args, progress: bool = True, **kwargs):
    """Run a flow (with a live display fed by the stage workers when ``progress``); one-line error on failure."""
    import contextlib

    from flows import tempserver, workers
    from flows.progress import ProgressDisplay

    try:
        tempserver.wait()  # a flow's client must not find the server half-started
    except tempserver.ServerStartError as e:
        fail(str(e), code=1)
    with ProgressDisplay(title) if progress else contextlib.nullcontext() as display, RunFailureReports() as reports:
        workers.set_progress_queue(display.queue if display else None)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the flow's own message is the one line a user needs
            fail(f"{title} failed: {reports.line(e)}", code=1)
        finally:
            workers.set_progress_queue(None)
