"""Run a recipe end to end: the stages that exist, in order, each reading the previous stage's manifest."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from flows import env  # noqa: F401  (before prefect)
from pipeline import storage
from pipeline.recipe import DemoSiteSource, Recipe, TrainRun

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


def train_clip_run(run: TrainRun, data: str, out_dir: str, eval_data: str | None = None) -> dict:
    """Train the recipe's CLIP run in this process (torchrun launches come with the orchestration flow)."""
    from training.train_clip import ClipTrainConfig, train

    cfg = ClipTrainConfig(
        data=data,
        out=out_dir,
        model=run.config,
        steps=run.steps,
        batch_size=run.batch_size,
        lr=run.lr,
        warmup_steps=min(100, max(1, run.steps // 10)),
        max_minutes=run.max_minutes,
        workers=1,
        save_every=max(100, run.steps // 5),
        eval_data=eval_data,
        eval_every=max(100, run.steps // 4) if eval_data else 0,
        progress=False,
    )
    return train(cfg)


def run_recipe(recipe: Recipe, out: str | None = None) -> RunResult:
    """Run every stage of ``recipe`` that this version implements; returns where the outputs are."""
    from flows.curate import run_curate
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
    runs = {}
    clip_run = next((t for t in recipe.train if t.kind == "clip"), None)
    if clip_run is not None and (clip_run.data or "scraped") == "scraped":
        clip_dir = storage.join(out, "clip")
        heldout = None
        if any(isinstance(src, DemoSiteSource) for src in recipe.sources) and storage.is_local(out):
            from training.synthetic import write_demo_shards

            heldout = storage.join(out, "heldout")  # fresh scenes with true labels, for zero-shot accuracy
            if not os.path.exists(os.path.join(heldout, "manifest.json")):
                write_demo_shards(heldout, n=600, seed=12345, size=recipe.scrape.image_size, per_shard=600)
        summary = train_clip_run(clip_run, scraped, clip_dir, eval_data=heldout)
        runs["clip"] = clip_dir
        result.datasets["clip model"] = clip_dir
        result.metrics["train clip"] = {"steps": summary.get("step"), **_last_eval(summary)}
    if recipe.curate is not None:
        clip, pretrained = recipe.curate.clip.model, recipe.curate.clip.pretrained
        if pretrained == "train:clip":
            if "clip" not in runs:
                raise ValueError(
                    "curate.clip.pretrained is 'train:clip' but the recipe trains no CLIP on scraped data"
                )
            clip, pretrained = runs["clip"], None
        curated = storage.join(out, "curated")
        cm = run_curate(scraped, curated, clip, pretrained=pretrained, cfg=recipe.curate, storage_options=so)
        result.datasets["curate"] = curated
        result.metrics["curate"] = {
            "kept": cm["stats"]["kept"],
            "dropped": cm["stats"]["dropped"],
            "report": storage.join(curated, "review", "index.html") if recipe.curate.report else None,
        }
    return result


def _last_eval(summary: dict) -> dict:
    evals = summary.get("eval") or []
    last = evals[-1] if evals else {}
    return {k: round(v, 3) for k, v in last.items() if isinstance(v, float) and k != "train_seconds"}
