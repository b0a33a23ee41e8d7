"""The ``altforge`` command line. Heavy modules are imported inside each command so ``--help`` stays fast."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from flows import env  # noqa: F401  (telemetry off before anything imports prefect)

app = typer.Typer(
    name="altforge",
    help="Turn the web's images and their alt text into curated WebDataset shards and trained image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command("demo-site")
def demo_site(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1 (0 = a free one)")] = 8765,
    seed: Annotated[int, typer.Option(help="site seed: the same seed gives the same site")] = 0,
    images: Annotated[int, typer.Option(help="number of content images")] = 3000,
    ground_truth: Annotated[str | None, typer.Option(help="write the ground truth (JSONL) here")] = None,
) -> None:
    """Serve the built-in demo web site on 127.0.0.1 until interrupted."""
    import signal
    import threading

    from pipeline import demo_site as ds

    try:
        server = ds.serve(ds.DemoSiteConfig(seed=seed, n_images=images), host="127.0.0.1", port=port)
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}")
    if ground_truth:
        server.write_ground_truth(ground_truth)
        typer.echo(f"ground truth: {ground_truth}")
    typer.echo(f"demo site: {server.url}  ({images} images, seed {seed}); Ctrl-C to stop", err=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


@app.command("validate")
def validate(recipe: Annotated[str, typer.Argument(help="recipe YAML file")]) -> None:
    """Check a recipe and print a summary of what it would build."""
    from pipeline.recipe import RecipeError, load_recipe

    try:
        r = load_recipe(recipe)
    except RecipeError as e:
        fail(str(e))
    kinds = ", ".join(s.kind for s in r.sources)
    stages = ["scrape"] + [s for s in ("curate", "encode") if getattr(r, s)] + [f"train {t.kind}" for t in r.train]
    typer.echo(f"{recipe}: ok — recipe '{r.name}', sources: {kinds}; stages: {', '.join(stages)}; output: {r.output}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
