"""Recipes: YAML files that say what to build (sources, stage settings, training runs), validated by pydantic.

A bad recipe fails with one line that names the file, the field and what is wrong: :class:`RecipeError`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # inf would not survive JSON


# ------------------------------------------------------------------------------------------------- sources


class DemoSiteSource(_Strict):
    """The built-in demo web site, served on a free loopback port for the duration of the run."""

    kind: Literal["demo_site"]
    seed: int = 0
    images: int = Field(3000, ge=20)  # content images on the site (the site needs 20 for its special pages)
    max_pages: int = Field(10_000, gt=0)


class SiteSource(_Strict):
    """Crawl web pages from seed URLs within the allowed domains."""

    kind: Literal["site"]
    urls: list[str] = Field(min_length=1)
    allowed_domains: list[str] | None = None  # default: the seeds' hosts
    max_pages: int = Field(10_000, gt=0)
    max_depth: int = Field(10, ge=0)


class UrlListSource(_Strict):
    """Image URLs (and captions) in parquet, csv, tsv, jsonl or txt, possibly gzipped; img2dataset lists work."""

    kind: Literal["url_list"]
    path: str
    input_format: str | None = None  # inferred from the extension when omitted
    url_col: str = "url"
    caption_col: str | None = "caption"
    extra_cols: list[str] = []


class WarcSource(_Strict):
    """WARC or WAT archives as Common Crawl publishes them (local paths or fsspec URLs)."""

    kind: Literal["warc"]
    paths: list[str] = Field(min_length=1)


class HFDatasetSource(_Strict):
    """A Hugging Face dataset of URLs and captions (hub id or local folder), read in streaming mode."""

    kind: Literal["hf_dataset"]
    name: str
    split: str = "train"
    url_col: str = "url"
    caption_col: str | None = "caption"


Source = Annotated[
    DemoSiteSource | SiteSource | UrlListSource | WarcSource | HFDatasetSource, Field(discriminator="kind")
]


_SOURCE_ADAPTER = TypeAdapter(Source)

# where a stage's model runs: auto (the first GPU when there is one, else the CPU) | cpu | cuda | cuda:N
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")]


def parse_source(data: dict):
    """Validate one source mapping (``{"kind": "site", "urls": [...]}``) into its model."""
    return _SOURCE_ADAPTER.validate_python(data)


# ------------------------------------------------------------------------------------------------- stages


class ScrapeConfig(_Strict):
    """Settings of the scrape stage: download politeness and safety, image processing, sharding."""

    image_size: int = Field(256, gt=0)  # px, see pipeline.images for what each resize mode does with it
    resize_mode: Literal["keep_ratio", "center_crop", "pad", "no"] = "keep_ratio"
    upscale: bool = False  # enlarge images smaller than image_size
    encode_format: Literal["jpg", "webp", "png"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    min_image_size: int = Field(0, ge=0)  # px, originals whose smaller side is below this are dropped
    max_aspect_ratio: float = Field(0.0, ge=0)  # max(w, h) / min(w, h); 0 = no limit
    max_pixels: int = Field(40_000_000, gt=0)  # declared width*height above this is a decompression bomb
    shard_size: int = Field(10_000, gt=0, lt=1_000_000)  # input records per shard
    processes: int = Field(2, gt=0)  # worker processes (decode, resize, encode)
    concurrency: int = Field(64, gt=0)  # open requests per process
    per_host_concurrency: int = Field(16, gt=0)  # open requests per host
    per_host_rate: float = Field(0.0, ge=0)  # requests/s per host, 0 = unlimited
    connect_timeout: float = Field(5.0, gt=0)  # seconds
    read_timeout: float = Field(10.0, gt=0)  # seconds without a byte
    timeout: float = Field(30.0, gt=0)  # seconds per request, whole body included
    retries: int = Field(2, ge=0)  # extra attempts for transient failures
    max_redirects: int = Field(5, ge=0)
    max_body_bytes: int = Field(20_000_000, gt=0)  # bytes
    user_agent: str | None = None  # default: altforge/<version> with a description
    allow_private_network: bool = False  # loopback/private addresses; only for local sites like the demo
    respect_robots: bool = True
    respect_opt_out: bool = True  # X-Robots-Tag noai / noimageai

    @model_validator(mode="after")
    def _aspect(self):
        if 0 < self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio must be 0 (no limit) or at least 1")
        return self

    def image_config(self):
        """The pipeline.images.ImageConfig these settings describe."""
        from pipeline.images import ImageConfig

        return ImageConfig(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            upscale=self.upscale,
            min_image_size=self.min_image_size,
            max_aspect_ratio=self.max_aspect_ratio,
            encode_format=self.encode_format,
            encode_quality=self.encode_quality,
            max_pixels=self.max_pixels,
        )

    def fetch_config(self):
        """The pipeline.fetch.FetchConfig these settings describe."""
        from pipeline.fetch import FetchConfig

        extra = {"user_agent": self.user_agent} if self.user_agent else {}
        return FetchConfig(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            total_timeout=self.timeout,
            max_body_bytes=self.max_body_bytes,
            max_redirects=self.max_redirects,
            retries=self.retries,
            concurrency=self.concurrency,
            per_host_concurrency=self.per_host_concurrency,
            per_host_rate=self.per_host_rate,
            allow_private_network=self.allow_private_network,
            respect_robots=self.respect_robots,
            respect_opt_out=self.respect_opt_out,
            **extra,
        )


class ClipModelRef(_Strict):
    """An open_clip model: architecture name plus a pretrained tag, checkpoint path or a run of this recipe."""

    model: str  # an open_clip architecture ("ViT-B-32", with pretrained) or a run directory of `altforge train clip`
    pretrained: str | None = None  # e.g. "laion2b_s34b_b79k", a checkpoint path, or "train:clip"


class DedupSection(_Strict):
    exact: bool = True  # by image sha256
    phash_distance: int | None = Field(4, ge=0, le=63)  # Hamming bits (at 64 any two images are twins); None: off
    embedding_threshold: float | None = Field(0.95, gt=0, le=1)  # cosine; None disables


class CurateSection(_Strict):
    """CLIP scoring, filters, dedup and tags."""

    clip: ClipModelRef
    min_score: float | None = Field(None, allow_inf_nan=False)  # cosine similarity, absolute threshold
    keep_fraction: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)  # global top fraction by score
    min_image_size: int = Field(0, ge=0)  # px
    max_aspect_ratio: float = Field(0.0, ge=0)
    min_caption_words: int = Field(1, ge=0)
    max_caption_chars: int = Field(1000, gt=0)
    dedup: DedupSection = DedupSection()
    tags: list[str] = []  # zero-shot labels
    report: bool = True
    batch_size: int = Field(256, gt=0)  # pairs per CLIP forward pass
    placeholder_captions: bool = True  # drop boilerplate alt text ("image", "logo", "IMG_0001.jpg", ...)
    languages: list[str] = []  # ISO 639-1 codes a caption must be in (needs the optional `langid`); [] = any
    tag_top_k: int = Field(3, gt=0)  # zero-shot labels stored per sample
    dedup_keep: Literal["highest_score", "first_key"] = "highest_score"  # which twin of a duplicate set stays
    shard_size: int = Field(10_000, gt=0, lt=1_000_000)  # kept samples per output shard (shards are even)
    workers: int | None = Field(None, ge=0)  # DataLoader decode workers; 0 = inline; None = 0 on CPU, 8 on GPU
    device: Device = "auto"
    previous: str | None = None  # an earlier curated dataset: the report shows what changed since it

    @model_validator(mode="after")
    def _one_threshold(self):
        if self.min_score is not None and self.keep_fraction is not None:
            raise ValueError("give min_score or keep_fraction, not both")
        return self


class EncodeSection(_Strict):
    """VAE latents and text embeddings."""

    vae: str  # diffusers id, local folder, or "train:vae"
    text_encoder: ClipModelRef
    resolution: int = Field(256, gt=0)  # px
    latent_mode: Literal["mean", "mean_logvar"] = "mean"
    store_text_embeddings: bool = True
    flip: bool = False  # also store a horizontally flipped latent
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # on GPU; CPU always float32
    batch_size: int = Field(64, gt=0)
    min_size: int = Field(0, ge=0)  # px; images whose shorter side is smaller are dropped; 0 keeps all
    workers: int | None = Field(None, ge=0)  # DataLoader decode workers; 0 = inline; None = 0 on CPU, up to 8 on GPU
    device: Device = "auto"


class TrainRun(_Strict):
    """One training run; launched with torchrun when nproc_per_node * nnodes > 1."""

    kind: Literal["clip", "vae", "ldm"]
    config: str  # model config name (training/models/configs) or open_clip architecture
    data: str | None = None  # "scraped" | "curated" | "latents" | a dataset URL; default: latents for ldm, else
    # curated when the recipe curates, else scraped
    steps: int = Field(gt=0)
    batch_size: int | None = Field(None, gt=0)  # per process; None: the trainer's default, as `altforge train`
    lr: float | None = Field(None, gt=0)  # peak learning rate; None: the trainer's default
    max_minutes: float = Field(0.0, ge=0)  # stop (and save) after this much training time; 0 = no limit
    nproc_per_node: int = Field(1, gt=0)
    nnodes: int = Field(1, gt=0)
    rdzv_endpoint: str | None = None  # host:port for multi-node
    # more trainer settings by their config field names, passed as flags: {latent_noise: 0.3} (vae),
    # {min_snr_gamma: 5, ema_decay: 0.9995} (ldm); `python -m training.train_<kind> --help` lists them
    options: dict[str, bool | int | float | str | list[int | float | str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _options(self) -> TrainRun:
        own = {"out", "model", *type(self).model_fields} - {"options"}  # model: the CLIP trainer's name for config
        for key in self.options:
            if key in own:
                field = "config" if key == "model" else key
                raise ValueError(f"options.{key}: set {field} on the run itself, not in options")
            if not key.isidentifier():
                raise ValueError(f"options: {key!r} is not a trainer setting name")
        if self.nnodes > 1 and not self.rdzv_endpoint:  # caught here, not after hours of data stages
            raise ValueError(f"nnodes {self.nnodes} needs rdzv_endpoint (host:port of the first node)")
        return self


TRAIN_TIMESTEPS = 1000  # the diffusion trainer's noise schedule length (training.objectives.NUM_TRAIN_TIMESTEPS)


SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds


class GenerateSection(_Strict):
    """The evaluation grid made at the end of a run."""

    prompts: list[str] = Field(min_length=1)
    negative: str | None = None
    steps: int = Field(20, gt=0, le=TRAIN_TIMESTEPS)
    guidance: float = Field(7.5, gt=0)  # 1 = unguided
    seed: int = Field(0, ge=0, le=SEED_MAX)  # image i of the grid uses seed + i
    n: int = Field(4, gt=0)
    scheduler: Literal["dpm", "ddim"] = "dpm"
    guidance_interval: tuple[int, int] | None = None  # [lo, hi]: guide only at timesteps lo..hi; null = every step
    evaluate: bool = True  # prompt accuracy, guidance sweep and the negative-prompt check (demo-site recipes)

    @model_validator(mode="after")
    def _interval_and_seeds(self) -> GenerateSection:
        iv = self.guidance_interval
        if iv is not None and not 0 <= iv[0] <= iv[1] < TRAIN_TIMESTEPS:
            raise ValueError(
                f"guidance_interval must be [lo, hi] with 0 <= lo <= hi < {TRAIN_TIMESTEPS}, got {list(iv)}"
            )
        last = self.seed + len(self.prompts) * self.n - 1
        if last > SEED_MAX:
            raise ValueError(
                f"seed {self.seed} with {len(self.prompts) * self.n} images needs seeds up to {last}, past 2**64-1"
            )
        return self


class Runtime(_Strict):
    """Where the tasks run."""

    task_runner: Literal["local", "process", "dask"] = "local"
    dask_address: str | None = None  # tcp://host:port of an existing Dask scheduler
    max_workers: int = Field(2, gt=0)  # local runner: shard tasks in flight (at least the stage's processes)

    @model_validator(mode="after")
    def _dask_needs_address(self):
        if self.task_runner == "dask" and not self.dask_address:
            raise ValueError("task_runner 'dask' needs dask_address")
        if self.dask_address and self.task_runner != "dask":
            raise ValueError(f"dask_address is only used with task_runner: dask, not {self.task_runner!r}")
        return self


DATA_KINDS = ("scraped", "curated", "latents")  # the datasets a recipe's stages write, in stage order


class Recipe(_Strict):
    """A whole build: sources, stage settings and training runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output: str = Field(min_length=1)  # base directory or fsspec URL (s3://...) for every dataset of this recipe
    # local directory for training runs and model folders; default: output when local, else ./runs/<name>
    models: str | None = Field(None, min_length=1)
    storage_options: dict = {}  # passed to fsspec (endpoint_url, ...); credentials come from the environment
    runtime: Runtime = Runtime()
    sources: list[Source] = Field(min_length=1)
    scrape: ScrapeConfig = ScrapeConfig()
    curate: CurateSection | None = None
    encode: EncodeSection | None = None
    train: list[TrainRun] = []
    generate: GenerateSection | None = None

    @field_validator("output", "models")
    @classmethod
    def _unpadded(cls, v: str | None) -> str | None:
        """A path of spaces, or one padded with them, is a typo that would make a folder named that way."""
        if v is not None and v != v.strip():
            raise ValueError(f"{v!r}: blank or padded with whitespace; write the path without it")
        return v

    def data_of(self, run: TrainRun) -> str:
        """The dataset a training run reads when the recipe does not say: latents for LDM, else curated or
        scraped."""
        if run.data:
            return run.data
        if run.kind == "ldm":
            return "latents"
        return "curated" if self.curate is not None else "scraped"

    def phase_of(self, run: TrainRun) -> int:
        """Where ``altforge run`` trains ``run``: after the stage that writes its data (other data comes last)."""
        data = self.data_of(run)
        return DATA_KINDS.index(data) if data in DATA_KINDS else len(DATA_KINDS)

    @model_validator(mode="after")
    def _stages_fit(self) -> Recipe:
        """What would otherwise fail after the stages before it had run (a whole scrape, say)."""
        for i, run in enumerate(self.train):
            data = self.data_of(run)
            if data in ("curated", "latents") and getattr(self, "curate" if data == "curated" else "encode") is None:
                section = "curate" if data == "curated" else "encode"
                raise ValueError(
                    f"train[{i}] ({run.kind}) reads {data!r} data, but the recipe has no {section} section"
                )
        refs = []  # (where, reference, the index in DATA_KINDS of the dataset that stage writes)
        if self.curate is not None:
            refs.append(("curate.clip.pretrained", self.curate.clip.pretrained, 1))
        if self.encode is not None:
            refs += [
                ("encode.vae", self.encode.vae, 2),
                ("encode.text_encoder.pretrained", self.encode.text_encoder.pretrained, 2),
            ]
        for where, ref, stage in refs:
            if ref and ref.startswith("train:"):
                kind = ref.removeprefix("train:")
                if not any(r.kind == kind and self.phase_of(r) < stage for r in self.train):
                    raise ValueError(
                        f"{where}: {ref!r} needs a {kind} run trained before that stage (a train entry of kind "
                        f"{kind} on {' or '.join(repr(d) for d in DATA_KINDS[:stage])} data)"
                    )
        if self.generate is not None and not any(r.kind == "ldm" for r in self.train):
            raise ValueError("generate: needs an ldm training run to generate with (a train entry of kind ldm)")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _error_line(path: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in _SOURCE_KINDS))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{_loc(loc)}: {msg}")
    return f"{path}: " + "; ".join(parts)


_SOURCE_KINDS = {"demo_site", "site", "url_list", "warc", "hf_dataset"}


def parse_recipe(data: object, path: str = "<recipe>") -> Recipe:
    """Validate an already-parsed recipe mapping."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_error_line(path, e)) from None


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that repeats a key; PyYAML keeps the last one (two ``train:`` lists would drop the first)."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2's floats: ``1e-4`` and ``-1e-05`` are numbers, where PyYAML (YAML 1.1, which
    wants a dot) reads them as strings, and a string in a run's ``options`` reaches the trainer as text. A repeated
    key in a mapping is an error (YAML 1.2 forbids it), not a silent overwrite."""

    def construct_mapping(self, node, deep=False):
        """Refuse a key written twice in one mapping; keys brought in by a ``<<:`` merge may be overridden."""
        seen = set()
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_recipe(path: str) -> Recipe:
    """Read and validate a recipe file; raises :class:`RecipeError` with one line on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        what = "" if isinstance(e, _DuplicateKey) else "YAML syntax error: "
        raise RecipeError(f"{path}{where}: {what}{problem}") from None
    return parse_recipe(data, path)
