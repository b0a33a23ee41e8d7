"""Run a recipe end to end: the stages that exist, in order, each reading the previous stage's manifest."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from flows import env  # noqa: F401  (before prefect)
from pipeline import storage
from pipeline.recipe import DemoSiteSource, Recipe

DEMO_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests", "demo.yaml")


@dataclass
class RunResult:
    """Where a recipe run put things, and the headline metrics of each stage."""

    output: str
    datasets: dict[str, str] = field(default_factory=dict)  # stage -> dataset URL
    metrics: dict[str, dict] = field(default_factory=dict)  # stage -> numbers worth printing
    ground_truth: str | None = None


@contextlib.contextmanager
def resolved_sources(recipe: Recipe, out: str):
    """Yield the recipe's sources as plain dicts, with demo sites started on free loopback ports meanwhile."""
    from pipeline.demo_site import DemoSiteConfig, serve

    servers, sources, gt_path = [], [], None
    try:
        for s in recipe.sources:
            if isinstance(s, DemoSiteSource):
                srv = serve(DemoSiteConfig(seed=s.seed, n_images=s.images), host="127.0.0.1", port=0)
                servers.append(srv)
                if storage.is_local(out):
                    os.makedirs(out, exist_ok=True)
                    gt_path = os.path.join(out, "demo-site-ground-truth.jsonl")
                    srv.write_ground_truth(gt_path)
                sources.append({"kind": "site", "urls": [srv.url], "max_pages": s.max_pages, "max_depth": 10})
            else:
                sources.append(s.model_dump())
        yield sources, gt_path
    finally:
        for srv in servers:
            srv.shutdown()


def run_recipe(recipe: Recipe, out: str | None = None) -> RunResult:
    """Run every stage of ``recipe`` that this version implements; returns where the outputs are."""
    from flows.scrape import run_scrape

    out = out or recipe.output
    result = RunResult(output=out)
    so = recipe.storage_options or None
    scraped = storage.join(out, "scraped")
    with resolved_sources(recipe, out) as (sources, gt_path):
        result.ground_truth = gt_path
        manifest = run_scrape(scraped, sources, recipe.scrape, so, recipe=recipe.model_dump(mode="json"))
    result.datasets["scrape"] = scraped
    result.metrics["scrape"] = {
        "records": manifest["stats"]["seen"],
        "images": manifest["stats"]["kept"],
        "shards": len(manifest["shards"]),
        "dropped": manifest["stats"]["dropped"],
        "extraction_dropped": manifest.get("extraction", {}),
    }
    return result
