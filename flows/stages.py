"""The stages of recipe_flow: each reads its inputs' manifests, runs as a subflow or task, and records itself.

Every stage function takes the run's :class:`StageContext`, returns its fingerprint, and is skipped when
:class:`flows.run.RunState` says its output is complete and current.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import env  # noqa: F401  (before prefect)
from flows.runners import Placement
from pipeline import storage
from pipeline.recipe import Recipe, TrainRun

# the file a finished run leaves in its folder (written last, after the final checkpoint)
FINISHED_FILE = {"clip": "open_clip_model.safetensors", "vae": "config.json", "ldm": "model_index.json"}


@dataclass
class StageContext:
    """What every stage of one recipe run shares."""

    recipe: Recipe
    out: str  # dataset root (local or fsspec URL)
    so: dict | None  # storage options
    placement: Placement
    state: object  # flows.run.RunState
    result: object  # flows.run.RunResult
    code: str  # code version (git SHA)
    datasets: dict[str, str] = field(default_factory=dict)  # "scraped" | "curated" | "latents" -> URL
    runs: dict[str, str] = field(default_factory=dict)  # "clip" | "vae" | "ldm" -> model folder
    run_fps: dict[str, str] = field(default_factory=dict)  # same keys -> fingerprint
    heldout: str | None = None  # demo scenes with true labels (demo-site recipes on local disk)
    previous: object = None  # RunState of the version this run's version adds no samples to (its outputs reused)
    reused: dict[str, str] = field(default_factory=dict)  # stage -> the version whose output it reuses

    def log(self, msg: str, *args) -> None:
        """Log through Prefect's run logger."""
        get_run_logger().info(msg, *args)

    def skip(self, stage: str, fp: str, output: str, done_file: str, legacy: tuple[str, ...] = ()) -> str | None:
        """The fingerprint ``stage`` was recorded under (its metrics restored) when it is complete and current, else
        None. ``legacy``: the same settings fingerprinted the way earlier versions did (before speed-only settings
        and unused models were left out), so their output stays current; downstream stages fingerprint what was
        recorded, and so stay current too."""
        for f in (fp, *legacy):
            entry = self.state.current(stage, f, output, done_file)
            if entry is not None:
                self.result.skipped.append(stage)
                self.result.metrics[stage] = entry.get("metrics", {})
                self.log("%s: complete and current (%s), skipped", stage, output)
                return f
        return None

    def reuse(self, stage: str, fp: str, output: str, done_file: str) -> str | None:
        """Where the previous version finished ``stage`` under ``fp``, when this run's version adds no samples to it
        (the same data): recorded in this version's state as reused, and read only, never written. None otherwise:
        no such version, other settings there (another fingerprint), or that stage never finished there."""
        if self.previous is None:
            return None
        entry = self.previous.stages.get(stage)
        if not entry or entry.get("fingerprint") != fp:
            return None
        where = self.previous.output_of(entry)
        done = where if done_file == output else storage.join(where, done_file[len(output.rstrip("/")) + 1 :])
        if self.previous.current(stage, fp, where, done) is None:
            return None
        version = entry.get("reused_from") or os.path.basename(self.previous.out.rstrip("/"))
        # where inside that version, so the record still resolves once OUT (with its versions) is moved
        inside = entry.get("reused_within") if entry.get("reused_from") else entry.get("within")
        self.reused[stage] = version
        self.result.metrics[stage] = entry.get("metrics", {})
        extra = {"reused_from": version, **({"reused_within": inside} if inside else {})}
        self.state.record(stage, fp, where, entry.get("metrics", {}), **extra)
        return where

    def begin(self, stage: str, fp: str, output: str, legacy: tuple[str, ...] = ()) -> None:
        """Before running ``stage``: set aside what another recipe setting or input left in ``output``."""
        moved = self.state.begin(stage, fp, output, legacy)
        if moved:
            self.log("%s: %s was built from other settings or inputs; moved to %s", stage, output, moved)


# --------------------------------------------------------------------------------------------------- scrape


def scrape_stage(ctx: StageContext, incremental: bool = False) -> str:
    """Scrape the recipe's sources into ``OUT/scraped`` (the scrape subflow resumes per shard).

    ``incremental``: ``OUT/scraped`` is a versioned dataset; this run adds a version with only new records and
    moves the rest of the run to ``OUT/versions/vNNNN`` (its own run state, curated data, latents and models).
    """
    from flows.run import RunState, fingerprint, resolved_sources
    from flows.scrape import run_scrape
    from pipeline.input_fingerprint import fingerprint_inputs, with_recorded
    from pipeline.plan import load_plan

    r = ctx.recipe
    dst = storage.join(ctx.out, "scraped")
    ctx.datasets["scraped"] = dst
    ctx.result.datasets["scrape"] = dst
    sources = [s.model_dump(mode="json") for s in r.sources]
    # what the input files hold now: a list rewritten at the same path rebuilds the scrape and what follows it
    inputs = fingerprint_inputs(sources, ctx.so, r.scrape.allow_private_network)
    # one unreadable now (moved, its server down) counts as recorded (run state, else plan): the scrape stays current
    if not incremental:
        saved = (ctx.state.stages.get("scrape") or {}).get("inputs") or (load_plan(dst, ctx.so) or {}).get("inputs")
        inputs = with_recorded(inputs, sources, saved)
    fp = fingerprint("scrape", sources, scrape_identity(r.scrape), *([inputs] if inputs else []))
    legacy = (fingerprint("scrape", sources, r.scrape.model_dump(mode="json")),)
    if inputs:  # recorded before input contents were fingerprinted: current (preflight compared the plan's record)
        legacy += (fingerprint("scrape", sources, scrape_identity(r.scrape)),)
    if storage.is_local(ctx.out):
        gt = os.path.join(ctx.out, "demo-site-ground-truth.jsonl")
        ctx.result.ground_truth = gt if os.path.exists(gt) else None
    if not incremental:  # a versioned dataset keeps its versions; the run adds one
        check_not_versioned(dst, ctx.so)
        if (done := ctx.skip("scrape", fp, dst, storage.join(dst, "manifest.json"), legacy)) is not None:
            _held_out(ctx)
            return done
        ctx.begin("scrape", fp, dst, legacy)
    with resolved_sources(r, ctx.out, dst, ctx.so, incremental) as (sources, gt_path):
        ctx.result.ground_truth = gt_path
        manifest = run_scrape(
            dst,
            sources,
            r.scrape,
            ctx.so,
            recipe=r.model_dump(mode="json"),
            placement=ctx.placement,
            incremental=incremental,
        )
    st = manifest["stats"]
    metrics = {"records": st["seen"], "images": st["kept"], "shards": len(manifest["shards"])}
    metrics["dropped"] = st["dropped"]
    data_fp = None
    if incremental:  # the rest of this run belongs to the new version
        version = f"v{int(manifest['version']):04d}"
        metrics.update(version=version, samples_in_version=manifest.get("total_samples"))
        fp = fingerprint(fp, manifest["dataset"])
        ctx.datasets["scraped"] = ctx.result.datasets["scrape"] = manifest["dataset"]
        data_fp = _same_data_as_previous(ctx, manifest)
        ctx.out = storage.join(ctx.out, "versions", version)
        ctx.result.models = os.path.join(ctx.result.models, "versions", version)  # runs are per version too
        ctx.state = RunState(ctx.out, ctx.so)
    ctx.result.metrics["scrape"] = metrics
    same = {"data_fingerprint": data_fp, "same_data_as": os.path.basename(ctx.previous.out)} if data_fp else {}
    ctx.state.record("scrape", fp, ctx.datasets["scraped"], metrics, inputs=inputs, **same)
    _held_out(ctx)
    return data_fp or fp


def _same_data_as_previous(ctx: StageContext, manifest: dict) -> str | None:
    """When the new version adds no samples, its data as a whole is the previous version's: returns the scrape
    fingerprint that version's later stages were built from (so equal settings give equal fingerprints, and
    :meth:`StageContext.reuse` finds their outputs) and sets ``ctx.previous``; None otherwise."""
    from flows.run import RunState

    if manifest["samples"] or not manifest.get("parent"):
        return None
    previous = RunState(storage.join(ctx.out, "versions", f"v{int(manifest['version']) - 1:04d}"), ctx.so)
    entry = previous.stages.get("scrape")
    if not entry or "finished_at" not in entry:
        return None
    ctx.previous = previous
    return entry.get("data_fingerprint") or entry["fingerprint"]


SPEED_SETTINGS = ("processes", "concurrency", "per_host_concurrency", "per_host_rate", "connect_timeout",
                  "read_timeout", "timeout", "retries")  # fmt: skip


def scrape_identity(cfg) -> dict:
    """The scrape section as fingerprinted: without the speed settings (processes, concurrency, rates, timeouts,
    retries), which the scrape's own resume lets change, so tuning them does not rebuild the dataset."""
    return cfg.model_dump(mode="json", exclude=set(SPEED_SETTINGS))


def check_not_versioned(dst: str, so: dict | None) -> None:
    """One-line ``ValueError`` when ``dst`` holds an incremental (versioned) dataset: a plain ``altforge run`` would
    write a plain scrape into it, and the deployment's next run would then refuse it."""
    from pipeline import versions

    if versions.is_versioned(dst, so):
        raise ValueError(
            f"{dst} holds versions of an incremental scrape (versions.json): run the recipe with `altforge run"
            " --incremental` (as its deployment does), or use another --out"
        )


def _held_out(ctx: StageContext) -> None:
    from flows.run import has_demo_site

    if not (has_demo_site(ctx.recipe) and storage.is_local(ctx.out)):
        return
    from training.synthetic import write_demo_shards

    heldout = storage.join(ctx.out, "heldout")  # fresh scenes with true labels: zero-shot and PSNR checks
    if not os.path.exists(os.path.join(heldout, "manifest.json")):
        write_demo_shards(heldout, n=600, seed=12345, size=ctx.recipe.scrape.image_size, per_shard=600)
    ctx.heldout = heldout


# --------------------------------------------------------------------------------------------------- curate


def resolve_model_ref(ctx: StageContext, model: str, pretrained: str | None) -> tuple[str, str | None]:
    """A recipe model reference with ``train:<kind>`` replaced by that run's model folder."""
    if pretrained and pretrained.startswith("train:"):
        kind = pretrained.removeprefix("train:")
        if kind not in ctx.runs:
            raise ValueError(f"{pretrained!r} is named, but no {kind} run has finished before this stage")
        return ctx.runs[kind], None
    return model, pretrained


def curate_stage(ctx: StageContext, fps: dict) -> str:
    """Score, filter, dedup and reshard the scraped pairs into ``OUT/curated`` with a review report."""
    from flows.curate import run_curate
    from flows.run import fingerprint

    c = ctx.recipe.curate
    clip, pretrained = resolve_model_ref(ctx, c.clip.model, c.clip.pretrained)
    dst = storage.join(ctx.out, "curated")
    ctx.datasets["curated"] = ctx.result.datasets["curate"] = dst
    uses_clip_run = (c.clip.pretrained or "").startswith("train:")
    fp = fingerprint("curate", curate_identity(c), fps["scraped"], ctx.run_fps.get("clip") if uses_clip_run else None)
    legacy = (fingerprint("curate", c.model_dump(mode="json"), fps["scraped"], ctx.run_fps.get("clip")),)
    report = storage.join(dst, "review", "index.html") if c.report else None
    if report:
        ctx.result.artifacts["review report"] = report
    if (done := ctx.skip("curate", fp, dst, storage.join(dst, "manifest.json"), legacy)) is not None:
        return done
    if (earlier := ctx.reuse("curate", fp, dst, storage.join(dst, "manifest.json"))) is not None:
        ctx.datasets["curated"] = ctx.result.datasets["curate"] = earlier
        if report:
            ctx.result.artifacts["review report"] = storage.join(earlier, "review", "index.html")
        return fp
    m = run_curate(
        ctx.datasets["scraped"],
        dst,
        clip,
        pretrained=pretrained,
        cfg=c,
        storage_options=ctx.so,
        recipe=ctx.recipe.model_dump(mode="json"),
        previous=c.previous,
        placement=ctx.placement,
    )
    metrics = {"kept": m["stats"]["kept"], "dropped": m["stats"]["dropped"]}
    ctx.result.metrics["curate"] = metrics
    ctx.state.record("curate", fp, dst, metrics)
    return fp


# --------------------------------------------------------------------------------------------------- encode


def curate_identity(c) -> dict:
    """The curate section as fingerprinted: ``workers``, ``device`` and ``batch_size`` change no decision."""
    return c.model_dump(mode="json", exclude={"workers", "device", "batch_size"})


def encode_identity(e) -> dict:
    """The encode section as fingerprinted: ``workers`` changes no latent, and ``min_size`` and ``device`` count
    only when set, so recipes written before they existed keep their fingerprints."""
    d = e.model_dump(mode="json", exclude={"workers"})
    for name, default in (("min_size", 0), ("device", "auto")):
        if d.get(name) == default:
            d.pop(name)
    return d


def encode_stage(ctx: StageContext, fps: dict) -> str:
    """VAE latents and text embeddings of the curated (or scraped) pairs into ``OUT/latents``."""
    from flows.encode import encode_config, run_encode
    from flows.run import fingerprint

    e = ctx.recipe.encode
    src = ctx.datasets.get("curated") or ctx.datasets["scraped"]
    vae, _ = resolve_model_ref(ctx, e.vae, e.vae if e.vae.startswith("train:") else None)
    text, pretrained = resolve_model_ref(ctx, e.text_encoder.model, e.text_encoder.pretrained)
    dst = storage.join(ctx.out, "latents")
    ctx.datasets["latents"] = ctx.result.datasets["encode"] = dst
    upstream = fps.get("curated") or fps["scraped"]
    runs = [ctx.run_fps.get(k) if ref.startswith("train:") else None
            for k, ref in (("vae", e.vae), ("clip", e.text_encoder.pretrained or ""))]  # fmt: skip
    fp = fingerprint("encode", encode_identity(e), upstream, *runs)
    legacy = (fingerprint("encode", encode_identity(e), upstream, ctx.run_fps.get("vae"), ctx.run_fps.get("clip")),)
    if (done := ctx.skip("encode", fp, dst, storage.join(dst, "manifest.json"), legacy)) is not None:
        return done
    if (earlier := ctx.reuse("encode", fp, dst, storage.join(dst, "manifest.json"))) is not None:
        ctx.datasets["latents"] = ctx.result.datasets["encode"] = earlier
        return fp
    ctx.begin("encode", fp, dst, legacy)
    m = run_encode(
        src,
        dst,
        vae=vae,
        text_encoder=text,
        pretrained=pretrained,
        cfg=encode_config(e),
        device=e.device,
        storage_options=ctx.so,
        recipe=ctx.recipe.model_dump(mode="json"),
        placement=ctx.placement,
    )
    metrics = {"latents": m["samples"], "shards": len(m["shards"]), "dropped": m["stats"]["dropped"]}
    ctx.result.metrics["encode"] = metrics
    ctx.state.record("encode", fp, dst, metrics)
    return fp


# ------------------------------------------------------------------------------------------------- training


def run_name(recipe: Recipe, run: TrainRun) -> str:
    """``<kind>``, or ``<kind>-2``, ... for a recipe's later runs of the same kind."""
    same = [t for t in recipe.train if t.kind == run.kind]
    return run.kind if same.index(run) == 0 else f"{run.kind}-{same.index(run) + 1}"


def run_dir(ctx: StageContext, run: TrainRun) -> str:
    """``MODELS/<run name>``: where a training run writes."""
    return os.path.join(ctx.result.models, run_name(ctx.recipe, run))


def trainer_flags(ctx: StageContext, run: TrainRun, data: str) -> list[str]:
    """Trainer flags beyond the recipe run's own (data, steps, batch, lr): checkpoints, evaluation, models."""
    flags = ["--save-every", str(max(100, run.steps // 5)), "--no-progress", "--workers", "1"]
    if run.kind == "clip":
        flags += ["--warmup-steps", str(min(100, max(1, run.steps // 10)))]
        if ctx.heldout:
            flags += ["--eval-data", ctx.heldout, "--eval-every", str(max(100, run.steps // 4))]
    elif run.kind == "vae":
        if ctx.recipe.encode is not None:
            flags += ["--resolution", str(ctx.recipe.encode.resolution)]
        if ctx.heldout:
            flags += ["--eval-data", ctx.heldout]
    elif ctx.recipe.encode is not None:  # ldm: the text encoder and VAE travel into the pipeline folder
        e = ctx.recipe.encode
        text, pretrained = resolve_model_ref(ctx, e.text_encoder.model, e.text_encoder.pretrained)
        vae, _ = resolve_model_ref(ctx, e.vae, e.vae if e.vae.startswith("train:") else None)
        flags += ["--text-encoder", text, "--vae", vae]
        if pretrained:
            flags += ["--text-pretrained", pretrained]
    if ctx.so and "://" in data:
        flags += ["--storage-options", json.dumps(ctx.so)]
    return flags


def external_data_identity(data: str, so: dict | None) -> list:
    """A training run's outside dataset as it is now: the manifest it reads (a versioned root's latest version's)
    and that file's size and stamp, so a new version or a rewritten dataset retrains the run."""
    from pipeline import versions

    manifest = versions.input_manifest_url(data, so)
    return [manifest, *storage.stamp(manifest, so)] if manifest else [data]


def train_stage(ctx: StageContext, phase: str, fps: dict) -> None:
    """Run the recipe's training runs whose data is ``phase`` ("scraped", "curated", "latents" or "external")."""
    from flows.launch import launch_training
    from flows.run import DATA_KINDS, fingerprint

    for run in ctx.recipe.train:
        data_kind = ctx.recipe.data_of(run)
        if (data_kind if data_kind in DATA_KINDS else "external") != phase:
            continue
        data = ctx.datasets.get(data_kind, data_kind)
        if data_kind in DATA_KINDS and data_kind not in ctx.datasets:
            raise ValueError(f"train {run.kind} reads {data_kind!r} data, but the recipe has no such stage")
        out_dir = run_dir(ctx, run)
        name = f"train {os.path.basename(out_dir)}"
        deps = [ctx.run_fps.get(k) for k in ("clip", "vae")] if run.kind == "ldm" else []
        if run.kind == "vae" and ctx.recipe.encode is not None:  # trainer_flags passes the encode resolution
            deps = [ctx.recipe.encode.resolution]
        fp = fingerprint(name, run.model_dump(mode="json"), fps.get(data_kind, data), deps)
        if data_kind not in DATA_KINDS:  # outside data: what it is now (a versioned root's latest version, say)
            fp = fingerprint(fp, external_data_identity(data, ctx.so))
        finished = os.path.join(out_dir, FINISHED_FILE[run.kind])
        done = ctx.skip(name, fp, out_dir, finished)
        if done is None and (earlier := ctx.reuse(name, fp, out_dir, finished)) is not None:
            out_dir, done = earlier, fp
        ctx.result.artifacts[f"{run.kind} model"] = out_dir
        ctx.result.artifacts[f"{run.kind} TensorBoard logs"] = os.path.join(out_dir, "tensorboard")
        ctx.runs[run.kind], ctx.run_fps[run.kind] = out_dir, done or fp
        if done is not None:
            continue
        ctx.begin(name, fp, out_dir)  # a changed run or input must not resume the old run's checkpoints
        os.makedirs(out_dir, exist_ok=True)
        summary = launch_training(run, data, out_dir, trainer_flags(ctx, run, data))
        metrics = headline_metrics(summary)
        ctx.result.metrics[name] = metrics
        ctx.state.record(name, fp, out_dir, metrics)


def headline_metrics(summary: dict) -> dict:
    """The numbers worth printing from a trainer's metrics.json: step, and the last evaluation's floats."""
    out = {"steps": summary.get("step")}
    evals = summary.get("eval")
    last = evals[-1] if isinstance(evals, list) and evals else summary.get("final", {})
    for k, v in (last or {}).items():
        if isinstance(v, float) and k != "train_seconds":
            out[k] = round(v, 3)
    for k in ("psnr", "scaling_factor", "samples_per_s", "train_seconds"):
        if isinstance(summary.get(k), float):
            out[k] = round(summary[k], 4)
    return out


# ------------------------------------------------------------------------------------------------- generate


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(model_dir: str, gen: dict, out_png: str, evaluate_with: dict | None) -> dict:
    """The recipe's evaluation grid (and, for demo recipes, prompt accuracy and the negative-prompt check)."""
    from flows.generate import evaluation_grid

    return evaluation_grid(model_dir, gen, out_png, evaluate_with)


def generate_stage(ctx: StageContext, fps: dict) -> None:
    """Sample the recipe's prompts with the trained diffusion model into ``MODELS/samples.png``."""
    from flows.run import fingerprint, has_demo_site

    g = ctx.recipe.generate
    png = os.path.join(ctx.result.models, "samples.png")
    ctx.result.artifacts["sample grid"] = png
    fp = fingerprint("generate", g.model_dump(mode="json"), ctx.run_fps["ldm"])
    if ctx.skip("generate", fp, png, png):
        return
    if (earlier := ctx.reuse("generate", fp, png, png)) is not None:
        ctx.result.artifacts["sample grid"] = earlier
        return
    evaluate_with = None
    if g.evaluate and has_demo_site(ctx.recipe) and ctx.heldout:
        evaluate_with = {"heldout": ctx.heldout, "clip": ctx.runs.get("clip")}
    metrics = generate_task(ctx.runs["ldm"], g.model_dump(mode="json"), png, evaluate_with)
    ctx.result.metrics["generate"] = metrics
    ctx.state.record("generate", fp, png, metrics)
