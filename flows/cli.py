"""The ``altforge`` command line. Heavy modules are imported inside each command so ``--help`` stays fast."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from flows import (
    cli_data,
    cli_run,
    cli_train,
    env,  # noqa: F401  (telemetry off before anything imports prefect)
    tempserver,
)
from flows.cli_common import STORAGE_OPTIONS_HELP, check_out, fail, parse_storage_options, run_flow

app = typer.Typer(
    name="altforge",
    help="Turn the web's images and their alt text into curated WebDataset shards and trained image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


train_app = typer.Typer(help="Train models on altforge datasets.", no_args_is_help=True)
app.add_typer(train_app, name="train")


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

    if not 0 <= port <= 65535:
        fail(f"--port must be 0..65535, got {port}")
    try:
        cfg = ds.DemoSiteConfig(seed=seed, n_images=images)
        server = ds.serve(cfg, host="127.0.0.1", port=port)
    except ValueError as e:
        fail(str(e).splitlines()[0])
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}")
    if ground_truth:
        try:
            server.write_ground_truth(ground_truth)
        except OSError as e:
            server.shutdown()
            fail(f"cannot write the ground truth to {ground_truth}: {e.strerror or e}")
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
        if any(t.options for t in r.train):
            from flows.launch import check_options

            check_options(r)
    except (RecipeError, RuntimeError) as e:
        fail(f"{recipe}: {e}" if isinstance(e, RuntimeError) else str(e))
    kinds = ", ".join(s.kind for s in r.sources)
    stages = ["scrape"] + [s for s in ("curate", "encode") if getattr(r, s)] + [f"train {t.kind}" for t in r.train]
    typer.echo(f"{recipe}: ok — recipe '{r.name}', sources: {kinds}; stages: {', '.join(stages)}; output: {r.output}")


def _print_manifest_summary(manifest: dict, dst: str) -> None:
    st = manifest["stats"]
    typer.echo(f"wrote {st['kept']} images in {len(manifest['shards'])} shards to {dst}  ({st['seen']} records tried)")
    if manifest.get("extraction"):
        typer.echo("  dropped before download: " + ", ".join(f"{k} {v}" for k, v in manifest["extraction"].items()))
    if st["dropped"]:
        typer.echo("  dropped: " + ", ".join(f"{k} {v}" for k, v in st["dropped"].items()))


_FLAG_OF = {"resize_mode": "resize", "paths": "warc", "urls": "site", "path": "url-list"}  # field -> CLI option


def _option_error(e) -> str:
    """One line for a pydantic error of settings built from CLI options: the option's name and the message."""
    err = e.errors(include_url=False)[0]
    msg = err["msg"].removeprefix("Value error, ")
    fields = [p for p in err["loc"] if isinstance(p, str) and p not in ("site", "warc", "url_list", "demo_site")]
    if not fields:  # a check across fields: its message names them
        return msg
    return f"--{_FLAG_OF.get(fields[0], fields[0].replace('_', '-'))}: {msg}"


@app.command()
def scrape(
    out: Annotated[str, typer.Option("--out", help="output dataset directory or fsspec URL (s3://...)")],
    site: Annotated[list[str] | None, typer.Option("--site", help="crawl from this seed URL (repeatable)")] = None,
    warc: Annotated[list[str] | None, typer.Option("--warc", help="WARC/WAT file or URL (repeatable)")] = None,
    url_list: Annotated[str | None, typer.Option("--url-list", help="parquet/csv/tsv/jsonl/txt list")] = None,
    url_col: Annotated[str, typer.Option(help="URL column of the list")] = "url",
    caption_col: Annotated[str, typer.Option(help="caption column of the list ('' = none)")] = "caption",
    input_format: Annotated[str | None, typer.Option(help="list format (default: from the extension)")] = None,
    image_size: Annotated[int, typer.Option(help="px")] = 256,
    resize: Annotated[str, typer.Option(help="keep_ratio | center_crop | pad | no")] = "keep_ratio",
    encode_format: Annotated[str, typer.Option(help="jpg | webp | png")] = "jpg",
    encode_quality: Annotated[int, typer.Option(help="JPEG/WebP quality")] = 95,
    min_image_size: Annotated[int, typer.Option(help="px; smaller originals are dropped")] = 0,
    max_aspect_ratio: Annotated[float, typer.Option(help="0 = no limit")] = 0.0,
    processes: Annotated[int, typer.Option(help="worker processes")] = 2,
    concurrency: Annotated[int, typer.Option(help="open requests per process")] = 64,
    per_host_rate: Annotated[float, typer.Option(help="requests/s per host, 0 = unlimited")] = 0.0,
    shard_size: Annotated[int, typer.Option(help="input records per shard")] = 10_000,
    max_pages: Annotated[int, typer.Option(help="crawl: page limit")] = 10_000,
    max_depth: Annotated[int, typer.Option(help="crawl: link depth limit")] = 10,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 30.0,
    allow_private_network: Annotated[
        bool, typer.Option(help="allow loopback/private addresses (refused by default)")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="re-attempt only the transient failures of an earlier run into new shards")
    ] = False,
    incremental: Annotated[
        bool,
        typer.Option(help="--out is a versioned dataset: write its next version with only records not seen before"),
    ] = False,
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP)] = None,
) -> None:
    """Scrape image/alt-text pairs from web pages, WARC/WAT archives or URL lists into WebDataset shards."""
    from pydantic import ValidationError

    from pipeline.recipe import ScrapeConfig, parse_source

    so = parse_storage_options(storage_options)
    given = [bool(site), bool(warc), bool(url_list)]
    if sum(given) > 1:
        fail("give one of --site, --warc or --url-list")
    if sum(given) == 0 and not retry_failed:
        fail("give an input: --site URL, --warc FILE or --url-list FILE")
    if url_list and "://" not in url_list and not os.path.exists(url_list):
        fail(f"URL list not found: {url_list}")
    for w in warc or []:
        if "://" not in w and not os.path.exists(w):
            fail(f"WARC file not found: {w}")
    try:
        cfg = ScrapeConfig(
            image_size=image_size,
            resize_mode=resize,
            encode_format=encode_format,
            encode_quality=encode_quality,
            min_image_size=min_image_size,
            max_aspect_ratio=max_aspect_ratio,
            processes=processes,
            concurrency=concurrency,
            per_host_rate=per_host_rate,
            shard_size=shard_size,
            timeout=timeout,
            allow_private_network=allow_private_network,
        )
    except ValidationError as e:
        fail(_option_error(e))
    if site:
        sources = [{"kind": "site", "urls": list(site), "max_pages": max_pages, "max_depth": max_depth}]
    elif warc:
        sources = [{"kind": "warc", "paths": list(warc)}]
    elif url_list:
        sources = [
            {
                "kind": "url_list",
                "path": url_list,
                "url_col": url_col,
                "caption_col": caption_col or None,
                "input_format": input_format,
            }
        ]
    else:
        sources = []
    for src in sources:  # the crawl budgets and list settings, checked now rather than inside the flow
        try:
            parse_source(src)
        except ValidationError as e:
            fail(_option_error(e))
    if incremental and retry_failed:
        fail("--retry-failed does not combine with --incremental: an incremental run attempts the earlier "
             "versions' transient failures again by itself")  # fmt: skip
    check_out(out, so)
    if not incremental:  # a rerun must continue what the output holds: checked before Prefect starts
        from pipeline.plan import load_plan
        from pipeline.scrape import check_resume

        try:
            check_resume(load_plan(out, so), sources, cfg, out, retry_failed, so)
        except (ValueError, OSError) as e:
            fail(str(e).splitlines()[0])
    tempserver.start()  # before prefect is imported; run_flow waits for it
    from flows.scrape import run_scrape

    if incremental:
        from pipeline import versions

        try:
            versions.next_version(out, so)
        except ValueError as e:
            fail(str(e).splitlines()[0])
    kw = {"retry_failed": retry_failed, "incremental": incremental, "storage_options": so}
    manifest = run_flow("scrape", run_scrape, out, sources, cfg, **kw)
    _print_manifest_summary(manifest, manifest.get("dataset", out))
    if incremental:
        typer.echo(f"  version {manifest.get('version')} of {out} (parent: {manifest.get('parent') or 'none'})")


@app.command()
def curate(
    in_dir: Annotated[str, typer.Argument(help="scraped dataset (directory or fsspec URL)")],
    out: Annotated[str, typer.Option("--out", help="curated dataset directory or fsspec URL")],
    clip: Annotated[str, typer.Option("--clip", help="open_clip name, a trainer run dir, or local-dir:DIR")],
    pretrained: Annotated[str | None, typer.Option(help="pretrained tag or weights file for --clip")] = None,
    min_score: Annotated[float | None, typer.Option(help="keep pairs with CLIP cosine >= X")] = None,
    keep_fraction: Annotated[float | None, typer.Option(help="keep the top F of pairs by score (global)")] = None,
    report: Annotated[bool, typer.Option("--report/--no-report", help="write review/index.html")] = False,
    previous: Annotated[
        str | None, typer.Option(help="earlier curated version, for the report's diff (implies --report)")
    ] = None,
    processes: Annotated[int, typer.Option(help="scoring worker processes")] = 1,
    storage_options: Annotated[str | None, typer.Option(help=STORAGE_OPTIONS_HELP)] = None,
) -> None:
    """Score pairs with CLIP, filter, dedup and tag them, reshard the kept ones, and write a review report."""
    so = parse_storage_options(storage_options)
    if min_score is not None and keep_fraction is not None:
        fail("give --min-score or --keep-fraction, not both")
    if keep_fraction is not None and not 0 < keep_fraction <= 1:
        fail("--keep-fraction must be in (0, 1]")
    if min_score is not None and not -float("inf") < min_score < float("inf"):  # NaN compares false
        fail(f"--min-score must be a finite cosine similarity, not {min_score}")
    if "://" not in in_dir and not os.path.isdir(in_dir):
        fail(f"dataset not found: {in_dir}")
    check_out(out, so)
    if previous:  # the diff lives in the report: check the old version now, not after the scoring
        from flows.runners import check_manifest

        try:
            check_manifest(previous, so, what="--previous", versioned=True)
        except RuntimeError as e:
            fail(str(e))
        report = True
    tempserver.start()  # before prefect is imported; run_flow waits for it
    from flows.curate import run_curate

    typer.echo(f"curating {in_dir} with {clip} ...", err=True)
    manifest = run_flow(
        "curate",
        run_curate,
        in_dir,
        out,
        clip,
        pretrained=pretrained,
        min_score=min_score,
        keep_fraction=keep_fraction,
        report=report,
        previous=previous,
        processes=processes,
        progress=False,
        storage_options=so,
    )
    _print_manifest_summary(manifest, out)
    if report:
        typer.echo(f"  review report: {os.path.join(out, 'review', 'index.html')}")


train_app.command("clip", context_settings=cli_train.PASS_THROUGH)(cli_train.train_clip)
train_app.command("vae", context_settings=cli_train.PASS_THROUGH)(cli_train.train_vae)
train_app.command("ldm", context_settings=cli_train.PASS_THROUGH)(cli_train.train_ldm)
app.command("generate", context_settings=cli_train.PASS_THROUGH)(cli_train.generate)
app.command("encode", context_settings=cli_data.PASS_THROUGH)(cli_data.encode)
app.command("versions")(cli_data.versions)
app.command("run")(cli_run.run)
app.command("demo")(cli_run.demo)
app.command("deploy")(cli_run.deploy)
app.command("launch")(cli_run.launch)


def main() -> None:
    """Console-script entry point. A wrong option or argument is one ``error:`` line naming the command's --help,
    like every other refusal, instead of the usage block and a box (whose "possible options" named one at random)."""
    try:
        rv = app(standalone_mode=False)
    except typer.TyperException as e:  # typer's own click: usage errors (no such option, bad value, ...)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
            e.show()  # a bare group: its help, as before
        else:
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            sys.stderr.write(f"error: {e.format_message().splitlines()[0]}{where}\n")
        sys.exit(getattr(e, "exit_code", 2))
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
