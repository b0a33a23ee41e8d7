"""The end of a recipe run: the one line an empty version's reuse gets, and the run report (JSON, Markdown, and the
same as Prefect artifacts)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import env  # noqa: F401  (before prefect)
from pipeline import storage
from pipeline.manifest import read_manifest

if TYPE_CHECKING:
    from flows.stages import StageContext

REUSED_WHAT = {"curate": "curated data", "encode": "latents", "generate": "sample grid"}  # else "models"


def note_reused(ctx: StageContext) -> None:
    """Say, in one line (logged, and in the result), which earlier version's outputs an empty version reuses."""
    if not ctx.reused:
        return
    named = {REUSED_WHAT.get(stage, "models") for stage in ctx.reused}
    what = [w for w in ("curated data", "latents", "models", "sample grid") if w in named]  # in the order built
    listed = ", ".join(what[:-1]) + f" and {what[-1]}" if len(what) > 1 else what[0]
    owners = " and ".join(f"{v}'s" for v in dict.fromkeys(ctx.reused.values()))
    version = os.path.basename(ctx.out.rstrip("/"))
    line = f"{version} adds no samples: {listed} {'are' if len(what) > 1 else 'is'} {owners}"
    ctx.result.reused = dict(ctx.reused)
    ctx.result.notes.append(line)
    get_run_logger().warning(line)  # a warning so the console shows it (run logs print from WARNING up)


def write_run_report(ctx: StageContext) -> None:
    """``OUT/run_report.json`` + ``.md`` (stages, outputs, metrics, lineage) and the same as Prefect artifacts."""
    from flows.run import models_where

    res = ctx.result
    lineage = {}
    for kind, url in ctx.datasets.items():
        try:
            parent = read_manifest(url, ctx.so).get("parent")  # a version's is relative to its own folder
            lineage[kind] = storage.resolve_ref(url, parent) if parent else None
        except FileNotFoundError:
            lineage[kind] = None
    doc = {**res.to_dict(), "lineage": lineage, "code_version": ctx.code}
    lines = [f"# Run report: {ctx.recipe.name}", "", f"Output: `{res.output}`; models: `{models_where(doc)}`", ""]
    lines += [*res.notes, ""] if res.notes else []
    lines += ["| stage | output | metrics |", "|---|---|---|"]
    outputs = {**res.datasets, **{k: v for k, v in res.artifacts.items() if k.endswith(" model")}}
    for stage, m in res.metrics.items():
        key = stage.removeprefix("train ").split()[0]
        where = outputs.get(stage) or outputs.get(f"{key} model") or ""
        skipped = " (skipped: current)" if stage in res.skipped else ""
        skipped = f" (reused: {res.reused[stage]}'s)" if stage in res.reused else skipped
        lines.append(f"| {stage}{skipped} | `{where}` | {json.dumps(m, default=str)} |")
    lines += ["", "## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in res.artifacts.items()]
    lines += ["", "## Lineage (each dataset's parent manifest)", ""]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items()]
    md = "\n".join(lines) + "\n"
    storage.write_bytes(storage.join(ctx.out, "run_report.json"), json.dumps(doc, indent=1).encode(), ctx.so)
    storage.write_bytes(storage.join(ctx.out, "run_report.md"), md.encode(), ctx.so)
    res.artifacts["run report"] = storage.join(ctx.out, "run_report.md")
    rows = [{"stage": s, "metrics": json.dumps(m, default=str)} for s, m in res.metrics.items()]
    create_table_artifact(rows, key="run-metrics", description=f"metrics of {ctx.recipe.name}")
    create_markdown_artifact(md, key="run-report")
