"""recipe_flow: one parent Prefect flow from web pages to a trained model, resumable stage by stage.

The stages run in the order their inputs allow: scrape -> the training runs on scraped data -> curate -> the
runs on curated data -> encode -> the runs on latents -> generate -> the run report. Each stage is a subflow or
task that reads the previous stage's manifest and writes its own. ``OUT/run.json`` records, per finished stage,
a fingerprint of everything that decided its output (its recipe section, its inputs' fingerprints; not the code
version, which each manifest records); a rerun skips a stage whose fingerprint still matches and whose output is
complete, so a failed or killed run resumes where it stopped (and inside a stage, finished shards and checkpoints
are reused). A stage whose fingerprint changed starts clean: :meth:`RunState.begin` moves the old output aside.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from flows import env  # noqa: F401  (before prefect)
from flows.runners import Placement, check_dask, check_manifest, check_output, placement_of
from pipeline import storage
from pipeline.manifest import code_version, read_manifest
from pipeline.recipe import DATA_KINDS, DemoSiteSource, Recipe, load_recipe

DEMO_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests", "demo.yaml")
STATE_FILE = "run.json"


@dataclass
class RunResult:
    """Where a recipe run put things, and the headline metrics of each stage."""

    output: str
    models: str = ""  # local directory of the training runs and model folders
    datasets: dict[str, str] = field(default_factory=dict)  # stage -> dataset URL
    artifacts: dict[str, str] = field(default_factory=dict)  # what -> path (report, TensorBoard logs, grid, ...)
    metrics: dict[str, dict] = field(default_factory=dict)  # stage -> numbers worth printing
    skipped: list[str] = field(default_factory=list)  # stages found complete and current
    reused: dict[str, str] = field(default_factory=dict)  # stage -> earlier version whose output it reuses
    notes: list[str] = field(default_factory=list)  # lines worth printing (what an empty version reused)
    ground_truth: str | None = None

    def to_dict(self) -> dict:
        """JSON-able form (the flow's return value and ``OUT/run_report.json``)."""
        return asdict(self)


def models_where(result: dict) -> str:
    """Where a run's models are: its models folder, or, when an empty version reused earlier runs, the folders the
    models actually lie in, each reused one marked (``.../versions/v0001 (v0001's, reused)``)."""
    reused = set((result.get("reused") or {}).values())
    folders: dict[str, list[str]] = {}
    for what, path in result.get("artifacts", {}).items():
        if what.endswith(" model"):
            folders.setdefault(os.path.dirname(os.path.abspath(path)), []).append(what.removesuffix(" model"))
    if not reused or not folders or set(folders) == {os.path.abspath(result["models"])}:
        return os.path.abspath(result["models"])
    parts = []
    for folder, kinds in folders.items():
        owner = os.path.basename(folder)
        label = f"{owner}'s, reused" if owner in reused else ""
        named = ", ".join(kinds) if len(folders) > 1 else ""
        note = ": ".join(x for x in (named, label) if x)
        parts.append(f"{folder} ({note})" if note else folder)
    return " and ".join(parts)


# ------------------------------------------------------------------------------------------------ run state


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (recipe sections, upstream fingerprints).

    The code version is deliberately not a part: updating altforge does not rebuild finished datasets and models
    (each manifest records the version that made it).
    """
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunState:
    """``OUT/run.json``: per stage, the fingerprint it was built with, its output and its metrics."""

    def __init__(self, out: str, storage_options: dict | None):
        self.out = out
        self.url = storage.join(out, STATE_FILE)
        self.so = storage_options
        self.stages: dict[str, dict] = {}
        if storage.exists(self.url, storage_options):
            self.stages = json.loads(storage.read_bytes(self.url, storage_options)).get("stages", {})

    def current(self, stage: str, fp: str, output: str, done_file: str) -> dict | None:
        """The recorded entry when ``stage`` finished with this fingerprint and its output is still there."""
        entry = self.stages.get(stage)
        if not entry or entry.get("fingerprint") != fp:
            return None
        if not storage.same_place(self.output_of(entry), output):
            return None
        if "finished_at" not in entry:  # started, not finished
            return None
        exists = storage.exists if "://" in done_file else lambda p, _so: os.path.exists(p)
        return entry if exists(done_file, self.so) else None

    def output_of(self, entry: dict) -> str:
        """Where a recorded stage's output is: its place inside OUT (wherever OUT is now), else as recorded. An
        output reused from an earlier version (``OUT/versions/<reused_from>``) is found beside this one's folder."""
        if entry.get("reused_from") and entry.get("reused_within"):
            versions = storage.resolve_ref(self.out.rstrip("/"), "..")
            return storage.join(versions, entry["reused_from"], entry["reused_within"])
        return storage.join(self.out, entry["within"]) if "within" in entry else entry.get("output", "")

    def begin(self, stage: str, fp: str, output: str, legacy: tuple[str, ...] = ()) -> str | None:
        """Record that ``stage`` starts building ``output`` under ``fp``; returns where a stale output went.

        The stage resumes inside ``output`` (finished shards, checkpoints). That is only right when what is there
        was built under the same fingerprint: output from another recipe setting or input (finished, or a killed
        run's part) is moved aside to ``OUTPUT.replaced-<its fingerprint>`` first, so the stage starts clean and
        nothing already written is lost. ``legacy``: the same settings fingerprinted as before a change of what the
        fingerprint covers; output recorded under one of them is resumed, not moved.
        """
        entry = self.stages.get(stage)
        moved = None
        stale = entry and entry.get("fingerprint") not in (fp, *legacy)
        if stale and storage.exists(output, self.so):  # (not the path: OUT moves)
            base = f"{output.rstrip('/')}.replaced-{entry.get('fingerprint')}"
            moved, k = base, 1
            while storage.exists(moved, self.so):
                k += 1
                moved = f"{base}-{k}"
            storage.move_tree(output, moved, self.so)
        self.stages[stage] = {
            "fingerprint": fp,
            **self._where(output),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write()
        return moved

    def record(self, stage: str, fp: str, output: str, metrics: dict, **extra) -> None:
        """Mark ``stage`` finished (written atomically on local disk, one PUT on object stores). ``extra``: more to
        record, such as ``reused_from`` (the earlier version whose output this stage reuses)."""
        self.stages[stage] = {
            "fingerprint": fp,
            **self._where(output),
            "metrics": metrics,
            **extra,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write()

    def _where(self, output: str) -> dict:
        """A stage's output as recorded: ``output`` as given, plus ``within``, its path inside OUT, which is what a
        rerun compares. So ``--out`` may be spelled relative, absolute or ``file://``, from any folder, and a whole
        OUT moved or synced elsewhere still finds its finished stages."""
        if storage.is_local(output) and storage.is_local(self.out):
            base = os.path.abspath(storage.local_path(self.out))
            inside = os.path.relpath(os.path.abspath(storage.local_path(output)), base)
            return {"output": output} if inside.startswith("..") else {"output": output, "within": inside}
        base = self.out.rstrip("/") + "/"
        inside = output.rstrip("/")[len(base) :] if output.startswith(base) else None
        return {"output": output, "within": inside} if inside else {"output": output}

    def _write(self) -> None:
        storage.write_whole(self.url, json.dumps({"stages": self.stages}, indent=1, default=str).encode(), self.so)


# ------------------------------------------------------------------------------------------------- sources


DEMO_SITES_FILE = "demo-sites.json"  # in the scrape's output: the loopback port each demo site was served on


@contextlib.contextmanager
def resolved_sources(
    recipe: Recipe, out: str, dst: str | None = None, storage_options: dict | None = None, incremental: bool = False
):
    """Yield the recipe's sources as plain dicts, with demo sites started on loopback ports meanwhile.

    A scrape plans with full URLs, so a demo site is served again on the port an unfinished scrape into ``dst``
    planned with (``dst/demo-sites.json``), else on a free one; a port now taken is a one-line error.
    """
    from pipeline.demo_site import DemoSiteConfig, serve

    ports_url = storage.join(dst, DEMO_SITES_FILE) if dst else None
    ports = {}
    unfinished = _unfinished_scrape(dst, storage_options, incremental) if dst else None
    if unfinished and ports_url and storage.exists(ports_url, storage_options):  # a finished one pins no port
        ports = json.loads(storage.read_bytes(ports_url, storage_options))
    servers, sources, gt_path = [], [], None
    try:
        for i, s in enumerate(recipe.sources):
            if isinstance(s, DemoSiteSource):
                key = f"{i}:seed={s.seed}:images={s.images}"
                port = int(ports.get(key, 0))
                try:
                    srv = serve(DemoSiteConfig(seed=s.seed, n_images=s.images), host="127.0.0.1", port=port)
                except OSError as e:
                    raise RuntimeError(
                        f"the unfinished scrape in {unfinished} planned the demo site at 127.0.0.1:{port}, which "
                        f"cannot be served again ({e.strerror or e}); free the port, or remove {unfinished} to "
                        "scrape it afresh"
                    ) from None
                servers.append(srv)
                if ports_url and ports.get(key) != srv.port:
                    ports[key] = srv.port
                    storage.write_bytes(ports_url, json.dumps(ports, indent=1).encode(), storage_options)
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


def _unfinished_scrape(dst: str, storage_options: dict | None, incremental: bool) -> str | None:
    """The dataset of a scrape into ``dst`` that was planned and not finished (a versioned root's next version),
    whose planned URLs name the demo site's port; None when there is none, and any free port will do."""
    from pipeline import plan as plans
    from pipeline import versions

    target = versions.next_version(dst, storage_options).url if incremental else dst
    planned = storage.exists(storage.join(plans.plan_dir(target), "plan.json"), storage_options)
    finished = storage.exists(storage.join(target, "manifest.json"), storage_options)
    return target if planned and not finished else None


def has_demo_site(recipe: Recipe) -> bool:
    """Whether the recipe scrapes the built-in demo site (then held-out demo scenes give true labels)."""
    return any(isinstance(s, DemoSiteSource) for s in recipe.sources)


def models_dir(recipe: Recipe, out: str) -> str:
    """The local directory of training runs: the output itself when local (``out`` as a plain path, see
    ``run_recipe``), else ``./runs/<recipe name>``."""
    if recipe.models:
        return storage.local_path(recipe.models)
    return out if storage.is_local(out) else os.path.join("runs", recipe.name)


def preflight(recipe: Recipe, out: str, placement: Placement) -> None:
    """Fail at the start, with one line, on what would otherwise fail halfway: storage, Dask, named inputs."""
    from flows.launch import check_options

    so = recipe.storage_options or None
    check_output(out, so)
    if placement.kind == "dask":
        check_dask(placement.dask_address)
    for run in recipe.train:
        if run.data and run.data not in DATA_KINDS:
            check_manifest(run.data, so, what=f"train {run.kind} data", versioned=True)  # a root: its latest
    check_options(recipe)
    if recipe.curate is not None and recipe.curate.previous:
        check_manifest(recipe.curate.previous, so, what="curate.previous", versioned=True)
    check_scrape_inputs(recipe, out, so)


FILE_KINDS = ("url_list", "warc", "hf_dataset")  # sources a recipe and its plan spell alike (not demo sites)


def check_scrape_inputs(recipe: Recipe, out: str, so: dict | None) -> None:
    """One-line ``ValueError`` when the plain scrape in ``OUT/scraped`` was planned from the recipe's input files
    and one of them holds other contents now: the stage would otherwise be skipped (or resumed) as current, and
    the new contents never scraped. (A versioned ``OUT/scraped`` has no plan of its own: each version plans anew.)
    """
    from pipeline import plan as plans
    from pipeline.scrape import check_inputs

    dst = storage.join(out, "scraped")
    plan = plans.load_plan(dst, so)
    if plan is None:
        return
    sources = [s.model_dump(mode="json") for s in recipe.sources if s.kind in FILE_KINDS]
    planned = [s for s in plan.get("sources") or [] if s.get("kind") in FILE_KINDS]
    if planned == json.loads(json.dumps(sources)):  # other sources: a new scrape, which the stage starts itself
        check_inputs(plan, sources, dst, so, recipe.scrape.allow_private_network)


# ----------------------------------------------------------------------------------------------- the flow


def recipe_flow_fn(
    recipe_path: str, out: str | None = None, dask_address: str | None = None, incremental: bool = False
) -> dict:
    """Body of the parent flow: load the recipe file and run it (see :func:`run_recipe`)."""
    return run_recipe(load_recipe(recipe_path), out, dask_address, incremental).to_dict()


def _make_flow():
    from prefect import flow

    return flow(name="recipe", log_prints=False, validate_parameters=True)(recipe_flow_fn)


recipe_flow = _make_flow()


def run_recipe(
    recipe: Recipe, out: str | None = None, dask_address: str | None = None, incremental: bool = False
) -> RunResult:
    """Run every stage of ``recipe`` in order, skipping those already complete; returns where things are.

    ``incremental`` (scheduled runs): the scrape writes the next version of ``OUT/scraped`` with only records not
    seen before, and the later stages of this run go under ``OUT/versions/vNNNN/`` (curated, latents, models).
    """
    from flows import run_report, stages

    out = storage.local_path(out or recipe.output)  # file:///x is /x for the stages that go on with os
    placement = placement_of(recipe.runtime, dask_address)
    preflight(recipe, out, placement)
    so = recipe.storage_options or None
    result = RunResult(output=out, models=models_dir(recipe, out))
    state = RunState(out, so)
    ctx = stages.StageContext(recipe, out, so, placement, state, result, code_version())

    fp = stages.scrape_stage(ctx, incremental)
    fps = {"scraped": fp}
    stages.train_stage(ctx, "scraped", fps)
    if recipe.curate is not None:
        fps["curated"] = stages.curate_stage(ctx, fps)
    stages.train_stage(ctx, "curated", fps)
    if recipe.encode is not None:
        fps["latents"] = stages.encode_stage(ctx, fps)
    stages.train_stage(ctx, "latents", fps)
    stages.train_stage(ctx, "external", fps)
    if recipe.generate is not None and "ldm" in ctx.runs:
        stages.generate_stage(ctx, fps)
    run_report.note_reused(ctx)
    run_report.write_run_report(ctx)
    return result


def manifest_samples(url: str, so: dict | None) -> int:
    """Samples in a finished dataset (0 when it has no manifest)."""
    try:
        return int(read_manifest(url, so)["samples"])
    except FileNotFoundError:
        return 0
