"""The latent stage: image shards in, VAE latents (+ text embeddings) out, so diffusion training never decodes a JPEG.

Per sample of a latent shard (same key as the source sample)::

    <key>.latent.npy        float16 (C, h, w): posterior mean x scaling_factor
    <key>.logvar.npy        float16 (C, h, w): posterior log-variance, unscaled   (latent_mode "mean_logvar")
    <key>.latent_flip.npy   the same for the horizontally flipped image          (flip; + logvar_flip.npy)
    <key>.text_emb.npy      float16 (L, D): per-token hidden states of the text encoder (store_text_embeddings)
    <key>.txt / <key>.json  the caption; the source metadata + crop box, source size and resolution

The dataset root also holds ``empty_text_emb.npy`` (float16 (L, D), the text encoder's output for ``""``, always
written: classifier-free guidance dropout swaps it in) and ``encode_config.json`` (what made the latents; a rerun
with other models or settings refuses to mix its shards with these). The models are passed in as plain callables
(:class:`Encoders`), so this module needs neither diffusers nor open_clip.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from pipeline import manifest as manifests
from pipeline import shards, storage, versions
from pipeline.latent_images import image_batches, local_copy, to_model_input
from pipeline.scrape import split_shard_url
from pipeline.stats import StageStats, error_line

EMPTY_EMBEDDING = "empty_text_emb.npy"
ENCODE_CONFIG = "encode_config.json"
REPEATED_KEYS = "repeated_keys.json"  # {shard name: keys an earlier source shard holds}: dropped as duplicate_key
LATENT_MODES = ("mean", "mean_logvar")
DTYPES = ("float32", "bfloat16", "float16")
RUN_ONLY_FIELDS = ("batch_size", "workers")  # settings that do not change what is written


@dataclass(frozen=True)
class EncodeConfig:
    """Settings of the latent stage (round-trips through JSON; written into the manifest)."""

    resolution: int = 256  # px, side of the square VAE input (shorter side resized to it, then center crop)
    latent_mode: str = "mean"  # "mean" | "mean_logvar" (also store the posterior log-variance so training samples)
    flip: bool = False  # also store the latent of the horizontally flipped image
    store_text_embeddings: bool = True  # per-sample (L, D) float16 text embeddings; else the trainer encodes
    dtype: str = "bfloat16"  # VAE weights and inputs on GPU: float32 | bfloat16 | float16; CPU always float32
    batch_size: int = 64  # images per VAE call
    workers: int | None = None  # DataLoader decode processes; None: 0 on CPU, up to 8 on GPU
    min_size: int = 0  # px; images whose shorter side is smaller are dropped (image_too_small); 0 keeps all

    def __post_init__(self):
        if self.resolution <= 0 or self.batch_size <= 0 or self.min_size < 0:
            raise ValueError("resolution and batch_size must be > 0 and min_size >= 0")
        if self.latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, not {self.latent_mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError("workers must be >= 0")

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncodeConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown encode settings: {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Encoders:
    """The models of the stage as plain callables, loaded once per worker by the caller."""

    images: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (B,3,H,W) in [-1,1] -> unscaled mean, logvar
    texts: Callable[[list[str]], torch.Tensor] | None  # captions -> (n, L, D); None when no text embeddings are stored
    scaling_factor: float  # the VAE's: latent = mean x scaling_factor
    device: str = "cpu"  # where image batches are sent
    dtype: str = "float32"  # dtype of the image batches (the VAE's weights)


# ------------------------------------------------------------------------------------------------------ encoding


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.float().to(torch.float16).cpu().numpy()


def encode_batch(images: torch.Tensor, captions: list[str], cfg: EncodeConfig, encoders: Encoders, stats: StageStats):
    """Latent arrays of one batch (uint8 (k,H,W,3)): ``{ext: float16 (k, ...)}`` with the extensions to store."""
    k = images.shape[0]
    with stats.timer("encode_images"):
        x = to_model_input(images, encoders.device, getattr(torch, encoders.dtype))
        if cfg.flip:
            x = torch.cat([x, x.flip(3)])  # one VAE call for both
        mean, logvar = encoders.images(x)
        out = {"latent.npy": _f16(mean.float() * encoders.scaling_factor)}
        if cfg.latent_mode == "mean_logvar":
            out["logvar.npy"] = _f16(logvar)
        if cfg.flip:
            out = {**{e: a[:k] for e, a in out.items()}, **{e.replace(".", "_flip."): a[k:] for e, a in out.items()}}
    if cfg.store_text_embeddings:
        with stats.timer("encode_texts"):
            out["text_emb.npy"] = _f16(encoders.texts(captions))
    return out


def _row(item: dict, status: str, error: str | None) -> dict:
    meta, info = item["meta"], item["info"] or {}
    src = info.get("source_size") or [None, None]
    ok = status == "success"
    return {
        "key": item["key"],
        "url": meta.get("url"),
        "page_url": meta.get("page_url"),
        "caption": item["caption"],
        "status": status,
        "error": error,
        "width": info.get("resolution") if ok else None,
        "height": info.get("resolution") if ok else None,
        "original_width": src[0],
        "original_height": src[1],
        "sha256": meta.get("sha256"),
        "crop": info.get("crop") if ok else None,
    }


def _check_key(item: dict, keys: set[str], earlier: frozenset[str] = frozenset()) -> None:
    """Mark an item whose key cannot be written (empty, with '.' or '/') or came earlier in the shard or in an
    earlier source shard (``earlier``)."""
    key = item["key"]
    if not key or "." in key or "/" in key:
        item["status"], item["error"] = "bad_key", f"invalid sample key {key!r}"
        item["key"] = f"bad-key-{len(keys)}"  # its parquet row still needs a key; the sample is not written
    elif key in keys:
        item["status"], item["error"] = "duplicate_key", "the key occurs earlier in the source shard"
    elif key in earlier:
        item["status"], item["error"] = "duplicate_key", "the key occurs in an earlier source shard"
    keys.add(item["key"])


def _earlier_keys(dataset_url: str, name: str, storage_options: dict | None = None) -> frozenset[str]:
    """The keys of source shard ``name`` that an earlier source shard holds (see :func:`repeated_keys`)."""
    url = storage.join(dataset_url, REPEATED_KEYS)
    if not storage.exists(url, storage_options):
        return frozenset()
    return frozenset(storage.read_json_object(url, storage_options).get(name, ()))


def encode_latents_shard(
    src_url: str,
    dst_url: str,
    cfg: EncodeConfig,
    encoders: Encoders,
    storage_options: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> StageStats:
    """Encode every sample of the image shard ``src_url`` into the latent shard ``dst_url`` (``.../NNNNNN.tar``).

    Every source sample becomes one parquet row; the dropped ones (``missing_image``, ``missing_caption``,
    ``decode_error``, ``image_too_small``, ``nonfinite_latent``) are counted by reason. ``progress`` receives count
    deltas after each batch.
    """
    if cfg.store_text_embeddings and encoders.texts is None:
        raise ValueError("store_text_embeddings needs a text encoder")
    dataset_url, index = split_shard_url(dst_url)
    device = torch.device(encoders.device)
    stats = StageStats()
    keys: set[str] = set()
    earlier = _earlier_keys(dataset_url, shards.shard_name(index), storage_options)
    with local_copy(src_url, storage_options) as path, shards.ShardWriter(dataset_url, index, storage_options) as w:
        batches = image_batches(path, cfg, device)
        while True:
            with stats.timer("read_decode"):
                try:
                    batch = next(batches, None)
                except Exception as e:  # a truncated or corrupt source tar: one line that names it
                    batches.close()  # the DataLoader's workers go now, not from a later garbage collection
                    raise ValueError(f"{src_url}: cannot read the source shard: {error_line(e)}") from None
            if batch is None:
                break
            before = Counter({"kept": stats.kept, **stats.dropped})
            items = batch["items"]
            decoded = [it for it in items if it["status"] == "success"]  # the rows of batch["images"]
            for it in items:  # a source tar this project did not write may break or repeat keys
                _check_key(it, keys, earlier)
            keep = [j for j, it in enumerate(decoded) if it["status"] == "success"]
            ok = [decoded[j] for j in keep]
            images = batch["images"] if len(keep) == len(decoded) else batch["images"][keep]
            arrays, finite = {}, np.ones(len(ok), bool)
            if ok:
                with torch.inference_mode():
                    arrays = encode_batch(images, [it["caption"] for it in ok], cfg, encoders, stats)
                for a in arrays.values():  # an fp16 VAE can overflow: such a latent would poison training
                    finite &= np.isfinite(a.reshape(len(ok), -1)).all(1)
            with stats.timer("write"):
                for j, it in enumerate(ok):
                    if not finite[j]:
                        it["status"], it["error"] = "nonfinite_latent", "NaN or inf in the VAE output"
                        continue
                    meta = {**it["meta"], **it["info"]}
                    w.write({"__key__": it["key"], "txt": it["caption"], "json": meta,
                             **{e: a[j] for e, a in arrays.items()}})  # fmt: skip
                for it in items:
                    w.add_row(_row(it, it["status"], it["error"]))
                    stats.seen += 1
                    if it["status"] == "success":
                        stats.kept += 1
                    else:
                        stats.drop(it["status"])
            if progress is not None:
                now = Counter({"kept": stats.kept, **stats.dropped})
                progress({"seen": len(items), **{k: v - before.get(k, 0) for k, v in now.items() if v != before[k]}})
        stats.check()
        with stats.timer("publish"):
            w.publish(stats)
    return stats


# ------------------------------------------------------------------------------------------------------ dataset


def latent_shards(src: str, storage_options: dict | None = None) -> dict[str, str]:
    """Output shard name -> source tar URL: each latent shard keeps its source shard's six-digit name."""
    urls = shards.shard_urls(src, storage_options)
    if not urls:
        raise ValueError(f"{src}: no shards to encode")
    out = {}
    for u in urls:
        stem = u.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
        if not (len(stem) == 6 and stem.isdigit()):
            raise ValueError(f"{u}: source shards must be named NNNNNN.tar")
        if stem in out:
            raise ValueError(f"{src}: two source shards are named {stem}.tar")
        out[stem] = u
    return out


parent_manifest_url = versions.input_manifest_url  # the input's manifest, recorded as the output's parent


def latent_config(cfg: EncodeConfig, vae: dict, text_encoder: dict, compute_dtype: str) -> dict:
    """The manifest's config: the settings, the VAE fingerprint, the text encoder, dtypes and the latent shape."""
    down = int(vae.get("downsample") or 8)
    channels = int(vae.get("latent_channels") or 4)
    if cfg.resolution % down:
        raise ValueError(f"--resolution {cfg.resolution} is not a multiple of the VAE's {down}x downsampling")
    return {
        **cfg.to_dict(),
        "vae": vae,
        "scaling_factor": float(vae["scaling_factor"]),
        "text_encoder": text_encoder,
        "compute_dtype": compute_dtype,
        "latent_dtype": "float16",
        "latent_shape": [channels, cfg.resolution // down, cfg.resolution // down],
        "empty_text_emb": EMPTY_EMBEDDING,
    }


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_empty_embedding(dataset: str, emb, storage_options: dict | None = None) -> str:
    """Store the empty-prompt embedding ``(L, D)`` as float16 ``empty_text_emb.npy``; returns its URL."""
    arr = emb.detach().float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    if arr.ndim != 2:
        raise ValueError(f"the empty-prompt embedding must be (L, D), not {arr.shape}")
    url = storage.join(dataset, EMPTY_EMBEDDING)
    storage.write_whole(url, _npy(arr.astype(np.float16)), storage_options, if_changed=True)
    return url


def _dataset_dir(dataset: str) -> str:
    return dataset.rsplit("/", 1)[0] if dataset.endswith(".json") else dataset


def read_empty_embedding(dataset: str, storage_options: dict | None = None) -> np.ndarray:
    """The float16 ``(L, D)`` empty-prompt embedding of a latent dataset (directory or manifest URL)."""
    url = storage.join(_dataset_dir(dataset), EMPTY_EMBEDDING)
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"{dataset}: no {EMPTY_EMBEDDING}: not a latent dataset")
    try:
        emb = np.load(io.BytesIO(storage.read_bytes(url, storage_options)), allow_pickle=False)
    except (EOFError, ValueError) as e:  # cut short or not an .npy: rerun encode into this --out to rewrite it
        raise ValueError(f"{url}: not a readable .npy array ({error_line(e)}); rerun encode to rewrite it") from None
    if emb.ndim != 2:
        raise ValueError(f"{url}: expected an (L, D) array, not {emb.shape}; rerun encode to rewrite it")
    return emb


def latent_info(dataset: str, storage_options: dict | None = None) -> dict:
    """What made a latent dataset (its manifest's config; an unfinished one's encode_config.json)."""
    root = _dataset_dir(dataset)
    url = storage.join(root, "manifest.json")
    if storage.exists(url, storage_options):
        m = json.loads(storage.read_bytes(url, storage_options))
        if m.get("stage") != "encode":
            raise ValueError(f"{dataset}: a '{m.get('stage')}' dataset, not a latent dataset")
        return m["config"]
    url = storage.join(root, ENCODE_CONFIG)
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"{dataset}: no manifest.json or {ENCODE_CONFIG}: not a latent dataset")
    return json.loads(storage.read_bytes(url, storage_options))


def _identity(config: dict) -> dict:
    """What must match for two runs to share a dataset: models by checksum where there is one, not by path."""
    out = {k: v for k, v in config.items() if k not in RUN_ONLY_FIELDS}
    vae, text = dict(out.get("vae") or {}), dict(out.get("text_encoder") or {})
    if vae.get("sha256"):
        vae.pop("ref", None)
    if text.get("sha256"):
        text.pop("model", None)
        text.pop("pretrained", None)
    return {**out, "vae": vae, "text_encoder": text}


def source_record(plan: dict[str, str], storage_options: dict | None = None) -> dict:
    """The source shards as they are now (names, sizes, modification stamps or ETags), as a short digest, and
    the keys repeated across them (``repeated_keys``, when there are any: see :func:`repeated_keys`)."""
    parts = [[name, url, *storage.stamp(url, storage_options)] for name, url in plan.items()]
    record = {"shards": len(parts), "digest": hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}
    repeats = repeated_keys(plan, storage_options)
    return {**record, "repeated_keys": repeats} if repeats else record


def repeated_keys(plan: dict[str, str], storage_options: dict | None = None) -> dict[str, list[str]]:
    """Shard name -> the keys of that source shard that a source shard earlier by name holds.

    Shards are encoded independently (in several processes, or ranks), so this is found once before any of them:
    every shard but the first with a key drops its copy as ``duplicate_key``, whatever the parallelism. Keys come
    from a shard's parquet where this project wrote it (a done shard), else from the tar's member headers (which
    reads the whole object on object stores).
    """
    seen: set[str] = set()
    out = {}
    for name in sorted(plan):
        keys = source_keys(plan[name], storage_options)
        if again := sorted(keys & seen):
            out[name] = again
        seen |= keys
    return out


def source_keys(url: str, storage_options: dict | None = None) -> set[str]:
    """The sample keys of one source tar (as :func:`pipeline.shards.iter_samples` names them)."""
    import fsspec
    import pyarrow.parquet as pq

    stem = url.removesuffix(".tar")
    if storage.exists(stem + "_stats.json", storage_options) and storage.exists(stem + ".parquet", storage_options):
        with fsspec.open(stem + ".parquet", "rb", **(storage_options or {})) as f:
            rows = pq.read_table(f, use_threads=False).to_pydict()
        if "key" in rows and "status" in rows:  # one row per attempted sample: those in the tar are "success"
            return {k for k, s in zip(rows["key"], rows["status"], strict=True) if s == "success"}
    keys = set()
    with (  # a broken tar fails later, in its own shard, naming itself
        contextlib.suppress(tarfile.TarError, EOFError, OSError),
        fsspec.open(url, "rb", **(storage_options or {})) as f,
        tarfile.open(fileobj=f, mode="r:") as tar,
    ):
        for member in tar:  # headers only: mode r: seeks past each body
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and "." in base:
                keys.add(base.split(".", 1)[0])
    return keys


def prepare_latents(
    dst: str, config: dict, empty_emb, storage_options: dict | None = None, source: dict | None = None
) -> None:
    """Write ``encode_config.json`` and the empty-prompt embedding before any shard.

    Raises ``ValueError`` when ``dst`` already holds latents made otherwise (other models, resolution, modes,
    dtype, or another or rewritten source, ``source`` from :func:`source_record`): resuming into it would mix two
    kinds of latents. Batch size and workers may change between runs, and models with a checksum may be named by
    another path.
    """
    source = dict(source or {})
    repeats = source.pop("repeated_keys", None)  # the keys themselves go to their own file, their count here
    if repeats:
        source["repeated_keys"] = sum(len(v) for v in repeats.values())
    config = json.loads(json.dumps({**config, "source": source} if source else config))
    url = storage.join(dst, ENCODE_CONFIG)
    if storage.exists(url, storage_options):
        old, new = _identity(json.loads(storage.read_bytes(url, storage_options))), _identity(config)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"{dst} holds latents made with other settings ({', '.join(diff)}); use a new --out")
    elif storage.exists(dst, storage_options):  # another dataset (the source itself, say): its shards would count
        names = storage.listdir(dst, storage_options)  # as done and its manifest be replaced
        if "manifest.json" in names or any(shards.SHARD_RE.match(n) for n in names):
            raise ValueError(f"{dst} holds a dataset this stage did not write (no {ENCODE_CONFIG}); use a new --out")
    storage.write_whole(
        url, json.dumps(config, indent=2).encode(), storage_options, if_changed=True
    )  # a kill never leaves a part
    if repeats:  # before any shard: the workers that encode them read it
        storage.write_whole(
            storage.join(dst, REPEATED_KEYS),
            json.dumps(repeats, sort_keys=True).encode(),
            storage_options,
            if_changed=True,
        )
    write_empty_embedding(dst, empty_emb, storage_options)


def finish_latents(
    dst: str,
    config: dict,
    parent: str | None,
    recipe: dict | None = None,
    storage_options: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Build and write the latent dataset's manifest (stage ``encode``); returns it."""
    m = manifests.build_manifest(dst, "encode", config, recipe, parent, storage_options, extra)
    StageStats.from_dict(m["stats"]).check()
    manifests.write_manifest(dst, m, storage_options)
    return m


def encode_dataset(
    src: str,
    dst: str,
    cfg: EncodeConfig,
    encoders: Encoders,
    config: dict,
    empty_emb,
    storage_options: dict | None = None,
    recipe: dict | None = None,
) -> dict:
    """Encode every source shard not yet done in this process (``config`` from :func:`latent_config`); the manifest."""
    plan = latent_shards(src, storage_options)
    prepare_latents(dst, config, empty_emb, storage_options, source_record(plan, storage_options))
    shards.clean_temporaries(dst, storage_options)
    for name, url in plan.items():
        if not shards.is_done(dst, int(name), storage_options):
            encode_latents_shard(url, shards.shard_files(dst, int(name))["tar"], cfg, encoders, storage_options)
    return finish_latents(dst, config, parent_manifest_url(src, storage_options), recipe, storage_options)
