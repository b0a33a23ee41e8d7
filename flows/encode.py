"""encode_flow: image shards -> latent shards (VAE latents, text embeddings), one task per shard, resumable.

``python -m flows.encode SRC --out DST --vae REF --text-encoder MODEL`` runs the same stage without Prefect
under torchrun (one process per GPU, each taking its own explicit list of pending shard URLs from rank 0), and
runs the Prefect flow when started alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import (
    env,  # noqa: F401  (before prefect)
    workers,
)
from flows.runners import Placement, wait_for_shards
from pipeline import shards, storage
from pipeline.curate.scorer import resolve_device
from pipeline.latents import (
    EncodeConfig,
    Encoders,
    encode_latents_shard,
    finish_latents,
    latent_config,
    latent_shards,
    parent_manifest_url,
    prepare_latents,
    source_record,
)
from pipeline.stats import StageStats
from training.loop import ArgumentParser


@dataclass(frozen=True)
class ModelRefs:
    """Which models encode: a VAE reference and an open_clip text encoder, and where they run."""

    vae: str  # diffusers folder, pipeline folder (its vae/) or hub id
    text_encoder: str  # open_clip name, exported run dir or local-dir:DIR
    pretrained: str | None = None  # open_clip pretrained tag or weights file for text_encoder
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def to_dict(self) -> dict:
        """A JSON-ready dict (tasks take it as an argument)."""
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "pretrained": self.pretrained,
            "device": self.device,
        }


@dataclass
class LoadedEncoders:
    """What one worker holds: the stage's callables and the records the manifest needs."""

    encoders: Encoders
    text: object  # training.models.text.TextEncoder
    vae_record: dict  # vae_fingerprint
    text_record: dict  # provenance + context_length + width

    def config(self, cfg: EncodeConfig) -> dict:
        """The latent manifest's config for ``cfg`` with these models."""
        return latent_config(cfg, self.vae_record, self.text_record, self.encoders.dtype)


def load_encoders(refs: ModelRefs, dtype: str) -> LoadedEncoders:
    """Load the VAE (in ``dtype`` on GPU, float32 on CPU, channels_last, eval) and the frozen text encoder."""
    from training.models.text import load_text_encoder
    from training.models.vae import encode_posterior, load_vae, vae_fingerprint

    dev = resolve_device(refs.device)
    compute = dtype if dev.type == "cuda" else "float32"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest conv kernels once
    vae = load_vae(refs.vae, device=dev, dtype=getattr(torch, compute))
    text = load_text_encoder(refs.text_encoder, refs.pretrained, device=str(dev))
    encoders = Encoders(
        images=functools.partial(encode_posterior, vae),
        texts=text.encode,
        scaling_factor=float(vae.config.scaling_factor),
        device=str(dev),
        dtype=compute,
    )
    record = {**text.provenance, "context_length": text.context_length, "width": text.width}
    return LoadedEncoders(encoders, text, vae_fingerprint(refs.vae), record)


def worker_encoders(refs: ModelRefs, dtype: str) -> LoadedEncoders:
    """The encoders of this process, loaded on first use and kept for every later shard."""
    return workers.worker_object(f"encoders:{refs!r}:{dtype}", load_encoders, refs, dtype)


def encode_partition(src_url: str, dst_url: str, cfg_json: str, refs_json: str, storage_options: dict | None) -> dict:
    """Encode one shard in a worker process (or inline) with this process's models; returns its stats."""
    cfg = EncodeConfig.from_dict(json.loads(cfg_json))
    loaded = worker_encoders(ModelRefs(**json.loads(refs_json)), cfg.dtype)
    progress = workers.worker_progress("encode")
    stats = encode_latents_shard(src_url, dst_url, cfg, loaded.encoders, storage_options, progress)
    return stats.to_dict()


@task(name="encode-shard", task_run_name="encode-{name}", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def encode_shard_task(
    name: str, src_url: str, dst: str, cfg_json: str, refs_json: str, storage_options: dict | None, processes: int
) -> dict:
    """Encode one source shard unless its latent shard is already done."""
    if shards.is_done(dst, int(name), storage_options):
        return {"skipped": name}
    dst_url = shards.shard_files(dst, int(name))["tar"]
    return workers.run("encode", processes, encode_partition, src_url, dst_url, cfg_json, refs_json, storage_options)


@flow(name="encode", log_prints=False)
def encode_flow(
    src: str,
    dst: str,
    refs: dict,
    cfg: dict,
    storage_options: dict | None = None,
    recipe: dict | None = None,
    processes: int = 1,
    submit: bool = False,
) -> dict:
    """Encode the image dataset ``src`` into the latent dataset ``dst``; returns its manifest.

    ``submit`` hands every shard to the task runner (Dask, process pools); otherwise, with one process, the shards
    run one after another in this process, where the model already has the GPU or every core.
    """
    log = get_run_logger()
    ecfg, mrefs = EncodeConfig.from_dict(cfg), ModelRefs(**refs)
    cfg_json, refs_json = json.dumps(ecfg.to_dict()), json.dumps(mrefs.to_dict())
    plan = latent_shards(src, storage_options)
    loaded = worker_encoders(mrefs, ecfg.dtype)  # here: the records and the empty prompt; reused by inline tasks
    config = loaded.config(ecfg)
    prepare_latents(dst, config, loaded.text.empty(), storage_options, source_record(plan, storage_options))
    shards.clean_temporaries(dst, storage_options)
    t0 = time.perf_counter()
    args = (dst, cfg_json, refs_json, storage_options, processes)
    if processes <= 1 and not submit:
        for name, url in plan.items():
            encode_shard_task(name, url, *args)
    else:
        futures = {name: encode_shard_task.submit(name, url, *args) for name, url in plan.items()}
        wait_for_shards(futures, "encode")
    shards.clean_temporaries(dst, storage_options)  # what writers killed mid-shard left (never visible)
    seconds = time.perf_counter() - t0
    manifest = finish_latents(dst, config, parent_manifest_url(src, storage_options), recipe, storage_options)
    publish_artifacts(manifest, dst, seconds)
    log.info("encode: %d of %d samples into %d latent shards", manifest["stats"]["kept"], manifest["stats"]["seen"],
             len(manifest["shards"]))  # fmt: skip
    return manifest


def funnel_rows(manifest: dict) -> list[dict]:
    """Samples seen, dropped by reason and written, as table rows."""
    st = manifest["stats"]
    rows = [{"step": "source samples", "count": st["seen"], "reason": ""}]
    rows += [{"step": "dropped", "count": -n, "reason": r} for r, n in st["dropped"].items()]
    rows.append({"step": "latents written", "count": st["kept"], "reason": ""})
    return rows


def publish_artifacts(manifest: dict, dst: str, seconds: float) -> None:
    """A table artifact with the funnel and a markdown artifact with the models, shapes and time spent per phase."""
    c = manifest["config"]
    create_table_artifact(funnel_rows(manifest), key="encode-funnel", description=f"encode funnel for {dst}")
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in manifest["stats"]["timings"].items())
    create_markdown_artifact(
        f"**encode** wrote {manifest['stats']['kept']} latents in {len(manifest['shards'])} shards to `{dst}`"
        f" ({seconds:.1f} s this run)\n\n"
        f"VAE `{c['vae']['ref']}` (scaling factor {c['scaling_factor']:.5f}), latents {c['latent_shape']} float16,"
        f" {c['resolution']} px, mode {c['latent_mode']}, flip {c['flip']}, compute {c['compute_dtype']}\n\n"
        f"Text encoder `{c['text_encoder']['model']}` ({c['text_encoder']['context_length']} x"
        f" {c['text_encoder']['width']}), per-sample embeddings: {c['store_text_embeddings']}\n\n"
        f"Time by phase (all shards): {timings or 'none'}",
        key="encode-summary",
    )


def encode_config(section=None, **overrides) -> EncodeConfig:
    """An EncodeConfig from a recipe's EncodeSection (when given) and CLI overrides (those not None)."""
    names = set(EncodeConfig.__dataclass_fields__)
    base = {k: v for k, v in (section.model_dump() if section is not None else {}).items() if k in names}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return EncodeConfig.from_dict(base)


def run_encode(
    src: str,
    dst: str,
    vae: str,
    text_encoder: str,
    pretrained: str | None = None,
    cfg: EncodeConfig | None = None,
    device: str = "auto",
    storage_options: dict | None = None,
    recipe: dict | None = None,
    processes: int = 1,
    placement: Placement | None = None,
) -> dict:
    """Run encode_flow (what ``altforge encode`` calls); returns the latent dataset's manifest."""
    refs = ModelRefs(vae, text_encoder, pretrained, device)
    placement = placement or Placement(max_workers=max(2, processes))
    runner = placement.task_runner(processes)
    return encode_flow.with_options(task_runner=runner)(
        src,
        dst,
        refs.to_dict(),
        (cfg or EncodeConfig()).to_dict(),
        storage_options,
        recipe,
        placement.worker_processes(processes),
        submit=placement.kind != "local",
    )


# ------------------------------------------------------------------------------------------ torchrun, no Prefect


def assign_shards(names: list[str], world_size: int) -> list[list[str]]:
    """Contiguous, balanced runs of the pending shard names, one list per rank (sizes differ by at most one)."""
    names = sorted(names)
    per, extra = divmod(len(names), world_size)
    out, start = [], 0
    for r in range(world_size):
        end = start + per + (1 if r < extra else 0)
        out.append(names[start:end])
        start = end
    return out


def dist_device(device: str) -> str:
    """What training.distributed.init_distributed takes for a --device value (cuda:N -> cuda)."""
    return "cpu" if device == "cpu" else "cuda" if device.startswith("cuda") else "auto"


def say(line: str) -> None:
    """One stdout line in one write: the ranks of a torchrun share the stream, and print() writes the text and its
    newline separately when stdout is unbuffered, so another rank's line could land between them."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def encode_ranks(
    src: str, dst: str, refs: ModelRefs, cfg: EncodeConfig, info, storage_options: dict | None = None
) -> dict:
    """One torchrun process (``info`` from init_distributed): rank 0 plans the pending shards, each rank encodes its
    own list, and the last one done writes the manifest. Returns this rank's summary."""
    from training.distributed import all_gather_object, cleanup

    try:
        device = str(info.device)  # this rank's GPU (LOCAL_RANK), or the CPU
        loaded = load_encoders(ModelRefs(refs.vae, refs.text_encoder, refs.pretrained, device), cfg.dtype)
        plan = latent_shards(src, storage_options)
        mine = None
        if info.is_main:
            try:
                config, source = loaded.config(cfg), source_record(plan, storage_options)
                prepare_latents(dst, config, loaded.text.empty(), storage_options, source)
                shards.clean_temporaries(dst, storage_options)
                pending = [n for n in plan if not shards.is_done(dst, int(n), storage_options)]
                urls = [[[n, plan[n]] for n in names] for names in assign_shards(pending, info.world_size)]
                mine = {"assignment": urls, "config": config, "all": list(plan)}
            except ValueError as e:  # refused: every rank learns it, so the others leave quietly
                mine = {"refused": str(e)}
        mine = all_gather_object(mine)[0]  # rank 0's plan, the same on every rank
        if "refused" in mine:
            if info.is_main:
                raise ValueError(mine["refused"])
            return {"rank": info.rank, "shards": [], "stats": StageStats().to_dict(), "wrote_manifest": False}
        work = mine["assignment"][info.rank]  # [name, source URL] pairs: this rank's and no other's
        say(f"rank {info.rank}/{info.world_size} on {device}: {len(work)} shard(s)")
        total = StageStats()
        for name, src_url in work:
            dst_url = shards.shard_files(dst, int(name))["tar"]
            stats = encode_latents_shard(src_url, dst_url, cfg, loaded.encoders, storage_options)
            total += stats
            say(f"rank {info.rank}: {src_url} -> {dst_url}: kept {stats.kept} of {stats.seen}")
        # Whoever publishes last sees every shard done (its check follows its own publish) and writes the manifest.
        wrote = all(shards.is_done(dst, int(n), storage_options) for n in mine["all"])
        if wrote:
            finish_latents(dst, mine["config"], parent_manifest_url(src, storage_options), None, storage_options)
        names = [n for n, _ in work]
        return {"rank": info.rank, "shards": names, "stats": total.to_dict(), "wrote_manifest": wrote}
    finally:
        cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m flows.encode``."""
    d = EncodeConfig()
    p = ArgumentParser(prog="altforge encode", description=__doc__.splitlines()[0])
    p.add_argument("src", help="image dataset: directory, manifest.json or brace pattern")
    p.add_argument("--out", required=True, help="latent dataset directory or fsspec URL")
    p.add_argument("--vae", required=True, help="diffusers VAE folder, pipeline folder or hub id")
    p.add_argument("--text-encoder", required=True, help="open_clip name, exported CLIP run dir or local-dir:DIR")
    p.add_argument("--pretrained", default=None, help="pretrained tag or weights file for --text-encoder")
    p.add_argument("--resolution", type=int, default=d.resolution, help="px")
    p.add_argument("--latent-mode", choices=["mean", "mean_logvar"], default=d.latent_mode)
    p.add_argument("--flip", action="store_true", help="also store the latents of the flipped images")
    p.add_argument("--no-text-embeddings", action="store_true", help="store no per-sample text embeddings")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=d.dtype, help="VAE dtype on GPU")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--min-size", type=int, default=d.min_size, help="px; smaller images are dropped")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each rank its LOCAL_RANK GPU)")
    p.add_argument("--processes", type=int, default=1, help="worker processes without torchrun (CPU)")
    p.add_argument("--storage-options", default=None, help="fsspec options for s3:// paths, as a JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Encode under torchrun (several processes) or through the Prefect flow (one); prints a one-line summary."""
    a = parse_args(argv)
    try:
        cfg = EncodeConfig(a.resolution, a.latent_mode, a.flip, not a.no_text_embeddings, a.dtype, a.batch_size,
                           a.workers, a.min_size)  # fmt: skip
        so = storage.options_from_json(a.storage_options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flows.cli_common import RunFailureReports
    from training.distributed import init_distributed

    with RunFailureReports() as reports:  # Prefect's run-failure tracebacks go to a file, not the terminal
        try:
            info = init_distributed(dist_device(a.device))  # torchrun's environment; sets nothing up when alone
            if info.distributed:
                refs = ModelRefs(a.vae, a.text_encoder, a.pretrained, a.device)
                say(json.dumps(encode_ranks(a.src, a.out, refs, cfg, info, so)))
                return 0
            kw = {"processes": a.processes, "storage_options": so}
            m = run_encode(a.src, a.out, a.vae, a.text_encoder, a.pretrained, cfg, a.device, **kw)
        except Exception as e:  # bad input, storage refusing a write, ...: one line, non-zero exit (as run_flow)
            print(f"error: {reports.line(e)}", file=sys.stderr)
            return 1
    print(
        f"wrote {m['stats']['kept']} latents of {m['stats']['seen']} samples in {len(m['shards'])} shards to {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
