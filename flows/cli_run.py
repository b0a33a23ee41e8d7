"""``altforge run`` and ``altforge demo``: a whole recipe as one parent Prefect flow, and where its outputs went."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from flows import env  # noqa: F401  (telemetry off before anything imports prefect)
from flows.cli_common import fail, run_flow


def print_result(result: dict, title: str) -> None:
    """Where everything is, and each stage's metrics."""
    typer.echo(f"\n{title} finished: datasets in {result['output']}, models in {os.path.abspath(result['models'])}")
    if result.get("ground_truth"):
        typer.echo(f"  {'demo site ground truth':<28} {result['ground_truth']}")
    for stage, url in result["datasets"].items():
        typer.echo(f"  {stage + ' shards':<28} {url}")
    for what, path in result["artifacts"].items():
        typer.echo(f"  {what:<28} {path}")
    if result["skipped"]:
        typer.echo(f"  skipped (complete and current): {', '.join(result['skipped'])}")
    typer.echo("metrics:")
    for stage, m in result["metrics"].items():
        typer.echo(f"  {stage:<14} " + ", ".join(f"{k}={v}" for k, v in m.items()))


def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file")],
    out: Annotated[str | None, typer.Option(help="override the recipe's output (a directory or s3://...)")] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="run the per-shard tasks on this Dask scheduler (tcp://host:port)")
    ] = None,
) -> None:
    """Run a recipe end to end as one Prefect flow; a rerun skips the stages already complete."""
    from flows.run import recipe_flow
    from pipeline.recipe import RecipeError, load_recipe

    try:
        load_recipe(recipe)
    except RecipeError as e:
        fail(str(e))
    result = run_flow("run", recipe_flow, os.path.abspath(recipe), out, dask_address)
    print_result(result, "run")


def demo(
    out: Annotated[str, typer.Option(help="where the demo's datasets, models and reports go")] = "demo-output",
) -> None:
    """Run the whole demo recipe on the built-in demo web site (served on a free loopback port meanwhile)."""
    from flows.run import DEMO_RECIPE, recipe_flow

    result = run_flow("demo", recipe_flow, DEMO_RECIPE, out)
    print_result(result, "demo")
