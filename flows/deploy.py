"""Scheduled recipe runs: a Prefect deployment of the recipe flow with a cron schedule, served from this process.

``altforge deploy RECIPE.yaml --cron "0 3 * * *"`` calls :func:`serve_recipe`. Served runs go to the Prefect API
in ``PREFECT_API_URL`` (a ``prefect server start`` on this machine, or a user's server); Prefect's temporary local
server never creates scheduled runs by itself, so schedules need a real server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from uuid import UUID
from zoneinfo import ZoneInfo

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments import run_deployment
from prefect.schedules import Cron

from pipeline import storage
from pipeline.recipe import load_recipe

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def default_flow():
    """The parent flow that runs a whole recipe (imported on use: it pulls in every stage)."""
    from flows.run import recipe_flow

    return recipe_flow


def cron_schedule(cron: str, timezone: str = "UTC"):
    """A Prefect Cron schedule; ValueError with one line for a bad expression or time zone, or one that never fires."""
    if not (timezone or "").strip():  # Prefect reads a blank time zone as UTC, which the user did not ask for
        raise ValueError(
            f"bad schedule {cron!r}: the time zone is blank; give an IANA name such as UTC or Europe/Berlin"
        )
    fields = cron.split()
    if len(fields) != 5 and not (len(fields) == 1 and fields[0].startswith("@")):
        # croniter reads a 6th field as seconds: "0 3 * * * *" would fire every second from 03:00:00 to 03:00:59
        raise ValueError(
            f"bad schedule {cron!r} ({timezone}): a cron expression has 5 fields (minute hour day month weekday) "
            f"or is an alias such as @daily, got {len(fields)} fields"
        )
    try:
        CronSchedule(cron=cron, timezone=timezone)  # validates both, unlike Cron() alone
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        errors = getattr(e, "errors", None)
        detail = errors()[0]["msg"].removeprefix("Value error, ") if errors else str(e)
        raise ValueError(f"bad schedule {cron!r} ({timezone}): {detail}") from None
    _check_fires(cron, timezone)
    return Cron(cron, timezone=timezone)


def _check_fires(cron: str, timezone: str) -> None:
    """Refuse a valid cron that matches no date ("0 2 30 2 *", 30 February): the server's scheduler would log
    CroniterBadDateError for it on every loop, forever."""
    from prefect._vendor.croniter import croniter  # what Prefect's server schedules with

    start = datetime.now(ZoneInfo(timezone)).replace(tzinfo=None)  # the server starts from wall time in the zone
    try:
        croniter(cron, start, day_or=True).get_next(datetime)  # day_or: Cron's default, as in CronSchedule
    except ValueError:  # CroniterBadDateError: no matching date within croniter's search (50 years)
        raise ValueError(f"bad schedule {cron!r} ({timezone}): it matches no date, so it would never run") from None


def recipe_deployment(
    recipe_path: str,
    cron: str,
    name: str | None = None,  # deployment name; default: the recipe's name
    timezone: str = "UTC",  # IANA name the cron expression is read in
    out: str | None = None,  # output base passed to the flow; default: the recipe's own
    flow=None,  # the flow to deploy, called as flow(recipe_path=..., out=...); default: flows.run.recipe_flow
):
    """A deployment (not yet registered) that runs ``recipe_path`` on the cron schedule."""
    recipe = load_recipe(recipe_path)  # a bad recipe fails here, with one line, not at 3 a.m.
    if name is not None and (not name or name != name.strip()):  # "" would quietly mean the recipe's name
        raise ValueError(f"deployment name {name!r}: blank or padded with whitespace; write the name without it")
    base = recipe.output if out is None else out  # not `out or`: a blank --out is refused, not replaced
    check_recipe(recipe, base)
    flow = flow or default_flow()
    if _incremental(flow):  # so does an output that already holds a plain (unversioned) scrape
        from pipeline.versions import next_version

        try:
            next_version(storage.join(base, "scraped"), recipe.storage_options or None)
        except ValueError:
            raise ValueError(
                f"{storage.join(base, 'scraped')} holds a plain scrape (from altforge run, finished or not); "
                "scheduled runs write dataset versions, so deploy with --out NEW_DIR"
            ) from None
    return flow.to_deployment(
        name=name or recipe.name,
        schedule=cron_schedule(cron, timezone),
        parameters={"recipe_path": os.path.abspath(recipe_path), "out": out, **_incremental(flow)},
        description=f"altforge recipe {recipe.name} ({os.path.abspath(recipe_path)})",
        tags=["altforge", recipe.name],
    )


def check_recipe(recipe, out: str) -> None:
    """What ``altforge run`` checks before it starts Prefect (output, Dask, named inputs, trainer options), as
    one-line ValueErrors; nothing runs."""
    from flows.run import preflight
    from flows.runners import placement_of

    try:
        preflight(recipe, storage.local_path(out), placement_of(recipe.runtime))
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None


def _incremental(flow) -> dict:
    """Scheduled recipe runs scrape incrementally (a new dataset version of only unseen records)."""
    import inspect

    return {"incremental": True} if "incremental" in inspect.signature(flow.fn).parameters else {}


def apply_recipe_deployment(recipe_path: str, cron: str, **kwargs) -> UUID:
    """Register the deployment with the Prefect API without serving it; returns its id."""
    return recipe_deployment(recipe_path, cron, **kwargs).apply()


def serve_recipe(
    recipe_path: str,
    cron: str,
    poll_seconds: float | None = None,
    announce: Callable[[], None] | None = None,
    **kwargs,
) -> None:
    """Register the deployment and run its scheduled and triggered runs here until SIGTERM or Ctrl-C.

    ``poll_seconds``: how often to ask the API for due runs (default: Prefect's runner setting, 10 s).
    ``announce`` is called once the recipe and schedule passed their checks, before serving starts.
    """
    deployment = recipe_deployment(recipe_path, cron, **kwargs)
    if announce is not None:
        announce()
    runner_options = {"query_seconds": poll_seconds} if poll_seconds else {}
    serve(deployment, limit=1, **runner_options)  # one recipe run at a time: they share output folders


def deployment_name(recipe_path: str, name: str | None = None, flow=None) -> str:
    """The ``flow-name/deployment-name`` that :func:`recipe_deployment` registers."""
    flow = flow or default_flow()
    return f"{flow.name}/{name or load_recipe(recipe_path).name}"


def read_deployment(full_name: str) -> dict:
    """A registered deployment as plain data: id, name, parameters, tags, whether it is paused, its schedules."""
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name(full_name)
    schedules = [
        {
            "cron": getattr(s.schedule, "cron", None),
            "timezone": getattr(s.schedule, "timezone", None),
            "active": s.active,
        }
        for s in d.schedules
    ]
    return {
        "id": d.id,
        "name": d.name,
        "parameters": d.parameters,
        "tags": d.tags,
        "paused": d.paused,  # a stopped serve process pauses its deployment; serving again resumes it
        "schedules": schedules,
    }


def trigger(full_name: str, parameters: dict | None = None) -> UUID:
    """Ask for one run of a deployment now, without waiting for it; returns the flow run id."""
    return run_deployment(full_name, parameters=parameters, timeout=0).id


def wait_for_flow_run(flow_run_id: UUID, timeout: float = 90.0, poll: float = 1.0) -> str:
    """Poll until the flow run reaches a final state; returns its type (COMPLETED, FAILED, ...).

    TimeoutError after ``timeout`` seconds, naming the state it was left in.
    """
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            kind = state.type.value if state else "NONE"
            if kind in FINAL_STATES:
                return kind
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {kind} after {timeout:.0f} s")
            time.sleep(poll)
