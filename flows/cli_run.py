"""``altforge run`` and ``altforge demo``: a whole recipe as one parent Prefect flow, and where its outputs went."""

from __future__ import annotations

import functools
import os
from typing import Annotated

import typer

from flows import (
    env,  # noqa: F401  (telemetry off before anything imports prefect)
    tempserver,
)
from flows.cli_common import fail, run_flow


def print_result(result: dict, title: str) -> None:
    """Where everything is, and each stage's metrics."""
    from flows.run import models_where

    typer.echo(f"\n{title} finished: datasets in {result['output']}, models in {models_where(result)}")
    if result.get("ground_truth"):
        typer.echo(f"  {'demo site ground truth':<28} {result['ground_truth']}")
    for stage, url in result["datasets"].items():
        typer.echo(f"  {stage + ' shards':<28} {url}")
    for what, path in result["artifacts"].items():
        typer.echo(f"  {what:<28} {path}")
    if result["skipped"]:
        typer.echo(f"  skipped (complete and current): {', '.join(result['skipped'])}")
    for note in result.get("notes") or []:  # e.g. a version that adds no samples reuses the one before's outputs
        typer.echo(f"  {note}")
    typer.echo("metrics:")
    for stage, m in result["metrics"].items():
        typer.echo(f"  {stage:<14} " + ", ".join(f"{k}={v}" for k, v in m.items()))


def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    out: Annotated[str | None, typer.Option(help="override the recipe's output (a directory or s3://...)")] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="run the per-shard tasks on this Dask scheduler (tcp://host:port)")
    ] = None,
    incremental: Annotated[
        bool, typer.Option(help="as a deployment's runs do: write the next version of OUT/scraped (new records only)")
    ] = False,
) -> None:
    """Run a recipe end to end as one Prefect flow; a rerun skips the stages already complete."""
    from pipeline.recipe import RecipeError, load_recipe

    try:
        r = load_recipe(recipe)
    except RecipeError as e:
        fail(str(e).splitlines()[0])
    if not tempserver.uses_dask(r.runtime, dask_address):  # Dask workers may be elsewhere: not a loopback server
        tempserver.start()  # before flows.run imports prefect; a preflight failure stops it at exit
    from flows.run import preflight, recipe_flow
    from flows.runners import placement_of

    try:
        preflight(r, out or r.output, placement_of(r.runtime, dask_address))  # before any Prefect start-up
        if incremental:  # a plain scrape there, finished or not, cannot take versions
            from pipeline import storage, versions

            versions.next_version(storage.join(out or r.output, "scraped"), r.storage_options or None)
    except (RecipeError, RuntimeError, ValueError) as e:
        fail(str(e).splitlines()[0])
    result = run_flow("run", recipe_flow, os.path.abspath(recipe), out, dask_address, incremental)
    print_result(result, "run")


def demo(
    out: Annotated[str, typer.Option(help="where the demo's datasets, models and reports go")] = "demo-output",
) -> None:
    """Run the whole demo recipe on the built-in demo web site (served on a free loopback port meanwhile)."""
    tempserver.start()  # before prefect is imported; run_flow waits for it
    from flows.run import DEMO_RECIPE, recipe_flow

    result = run_flow("demo", recipe_flow, DEMO_RECIPE, out)
    print_result(result, "demo")


def deploy(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    cron: Annotated[str, typer.Option(help='cron schedule, e.g. "0 3 * * *" (03:00 every day)')],
    name: Annotated[str | None, typer.Option(help="deployment name (default: the recipe's name)")] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone the cron expression is read in")] = "UTC",
    out: Annotated[str | None, typer.Option(help="override the recipe's output")] = None,
    apply_only: Annotated[bool, typer.Option(help="register the deployment and exit, without serving it")] = False,
) -> None:
    """Register the recipe as a scheduled Prefect deployment (incremental scrapes) and serve it until stopped."""
    import httpx

    from flows.deploy import apply_recipe_deployment, deployment_name, serve_recipe
    from pipeline.recipe import RecipeError

    if not os.environ.get("PREFECT_API_URL"):
        typer.secho(
            "warning: PREFECT_API_URL is not set; schedules fire only against a running Prefect server "
            "(prefect server start --host 127.0.0.1, then PREFECT_API_URL=http://127.0.0.1:4200/api)",
            err=True,
            fg=typer.colors.YELLOW,
        )
    path = os.path.abspath(recipe)
    try:
        full = deployment_name(path, name)
        if apply_only:
            apply_recipe_deployment(path, cron, name=name, timezone=timezone, out=out)
            typer.echo(f"registered {full} on '{cron}' ({timezone})")
            return
        serving = f"serving {full} on '{cron}' ({timezone}); SIGTERM or Ctrl-C to stop"
        announce = functools.partial(typer.echo, serving, err=True)  # after the checks: a refusal is one line
        serve_recipe(path, cron, name=name, timezone=timezone, out=out, announce=announce)
    except (RecipeError, ValueError) as e:
        fail(str(e).splitlines()[0])
    except (OSError, httpx.HTTPError) as e:  # the Prefect API is down or refuses the connection
        api = os.environ.get("PREFECT_API_URL") or "Prefect's temporary server"
        fail(f"cannot reach the Prefect API at {api}: {(str(e) or type(e).__name__).splitlines()[0]}")


def launch(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    print_: Annotated[str, typer.Option("--print", help="torchrun | slurm: print the command or an sbatch script")],
    run: Annotated[str | None, typer.Option(help="which training run: clip | vae | ldm (default: the first)")] = None,
    out: Annotated[str | None, typer.Option(help="override the recipe's output")] = None,
) -> None:
    """Print the torchrun command or sbatch script of a recipe's training run, for a user's cluster."""
    from flows.launch import print_launch
    from pipeline.recipe import RecipeError, load_recipe

    try:
        typer.echo(print_launch(load_recipe(recipe), print_, kind=run, out=out), nl=False)
    except (RecipeError, ValueError) as e:
        fail(str(e).splitlines()[0])
