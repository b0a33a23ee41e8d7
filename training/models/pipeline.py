"""The trained latent diffusion model as a diffusers-style pipeline folder, and loading it back.

Layout::

    MODEL_DIR/
      model_index.json          how to assemble the parts: classes, prediction type, resolution, lineage
      unet/                     UNet2DConditionModel.save_pretrained (config.json + safetensors)
      vae/                      AutoencoderKL.save_pretrained
      scheduler/                DDPMScheduler config of the training noise schedule (scheduler_config.json)
      text_encoder/             an open_clip export: open_clip_config.json + open_clip_model.safetensors
      empty_text_emb.npy        float32 (context_length, width): the unconditional embedding CFG was trained with

``model_index.json`` is written last, so a folder that has it is complete. Loading it in Python::

    import torch
    from training.models.pipeline import load_pipeline
    from training.sample import generate, save_grid

    pipe = load_pipeline("MODEL_DIR", device="cuda" if torch.cuda.is_available() else "cpu")
    images = generate(pipe, ["a red circle"], negative="blue", steps=20, guidance=7.5, seed=0, n=4)
    save_grid(images, "grid.png", {"prompt": "a red circle", "seed": 0, "steps": 20, "guidance": 7.5})

    # or the parts, in their own ecosystems:
    # UNet2DConditionModel.from_pretrained("MODEL_DIR", subfolder="unet"), AutoencoderKL(..., subfolder="vae"),
    # DDPMScheduler.from_pretrained("MODEL_DIR", subfolder="scheduler"),
    # open_clip.create_model_and_transforms("local-dir:MODEL_DIR/text_encoder")
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from training.models.text import TextEncoder, load_text_encoder
from training.objectives import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, PREDICTION_TYPES

MODEL_INDEX = "model_index.json"
EMPTY_EMB = "empty_text_emb.npy"
PIPELINE_CLASS = "AltforgeLatentDiffusion"
OPEN_CLIP_FILES = ("open_clip_config.json",)
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")


def default_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion's training schedule: DDPM, T = 1000, ``scaled_linear`` betas from 0.00085 to 0.012."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_schedule": "scaled_linear",
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "prediction_type": prediction_type,
        "clip_sample": False,  # latents are not bounded to [-1, 1]
    }


def _downsample(vae_config) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _copy_text_encoder(src: str | Path, pretrained: str | None, dst: Path) -> None:
    """Copy an open_clip export directory, or export an open_clip name (+ pretrained tag/file) into ``dst``."""
    src_path = Path(str(src).removeprefix("local-dir:"))
    dst.mkdir(parents=True, exist_ok=True)
    if (src_path / OPEN_CLIP_FILES[0]).is_file():
        if src_path.resolve() == dst.resolve():
            return  # re-saving a loaded pipeline into its own folder
        weights = [f for f in OPEN_CLIP_WEIGHT_FILES if (src_path / f).is_file()]
        if not weights:
            raise ValueError(f"{src_path}: open_clip directory without weights ({', '.join(OPEN_CLIP_WEIGHT_FILES)})")
        for stale in OPEN_CLIP_WEIGHT_FILES:  # open_clip prefers safetensors: an old copy would win over the new
            (dst / stale).unlink(missing_ok=True)
        for name in (*OPEN_CLIP_FILES, weights[0]):
            shutil.copyfile(src_path / name, dst / name)
        return
    import open_clip

    from training.models.clip import export_open_clip

    try:
        model = open_clip.create_model(str(src), pretrained=pretrained)
    except (RuntimeError, FileNotFoundError) as e:
        raise ValueError(f"cannot load text encoder {src!r} (pretrained={pretrained!r}): {e}") from e
    export_open_clip(model, open_clip.get_model_config(str(src)), dst)


def _write_text_state(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` over the matching tensors of the open_clip export in ``folder`` (safetensors, atomically)."""
    from safetensors.torch import load_file, save_file

    weights = folder / OPEN_CLIP_WEIGHT_FILES[0]
    if not weights.is_file():
        raise ValueError(f"{folder}: a tuned text tower needs {OPEN_CLIP_WEIGHT_FILES[0]} to write into")
    stored = load_file(str(weights))
    unknown = sorted(set(state) - set(stored))
    if unknown:
        raise ValueError(f"{folder}: the tuned text tower has weights the export lacks: {', '.join(unknown[:3])}")
    stored.update({k: v.detach().to("cpu", stored[k].dtype).contiguous() for k, v in state.items()})
    tmp = weights.with_suffix(".tmp")
    save_file(stored, str(tmp))
    tmp.replace(weights)


def save_pipeline(
    out: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder_dir: str | Path,  # an open_clip export dir, or an open_clip model name (see text_encoder_pretrained)
    scheduler_config: dict | None = None,  # DDPMScheduler kwargs of the training schedule; None: SD's schedule
    prediction_type: str = "epsilon",  # "epsilon" | "v_prediction"
    lineage: dict | None = None,  # where it came from: data manifest, training config, steps, ...
    text_encoder_pretrained: str | None = None,  # pretrained tag or file when text_encoder_dir is a model name
    empty_emb: torch.Tensor | np.ndarray | None = None,  # (L, D) unconditional embedding; None: encode ""
    text_state: dict[str, torch.Tensor] | None = None,  # tuned text-tower weights that replace the copied ones
) -> Path:
    """Write the pipeline folder (see the module docstring); ``model_index.json`` last. Returns ``out``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_INDEX).unlink(missing_ok=True)  # the folder is incomplete until the index is rewritten
    unet = getattr(unet, "module", unet)
    vae = getattr(vae, "module", vae)
    _copy_text_encoder(text_encoder_dir, text_encoder_pretrained, out / "text_encoder")
    if text_state is not None:
        _write_text_state(out / "text_encoder", text_state)
    encoder = load_text_encoder(str(out / "text_encoder"), device="cpu")
    if empty_emb is None:
        empty_emb = encoder.empty()
    empty = np.asarray(torch.as_tensor(empty_emb).detach().cpu().float().numpy(), dtype=np.float32)
    if empty.shape != (encoder.context_length, encoder.width):
        raise ValueError(f"empty_emb shape {empty.shape} != text encoder's {(encoder.context_length, encoder.width)}")
    if unet.config.cross_attention_dim != encoder.width:
        raise ValueError(f"U-Net cross_attention_dim {unet.config.cross_attention_dim} != text width {encoder.width}")
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    sched = dict(scheduler_config or default_scheduler_config(prediction_type))
    sched["prediction_type"] = prediction_type
    DDPMScheduler(**{k: v for k, v in sched.items() if not k.startswith("_")}).save_pretrained(str(out / "scheduler"))
    np.save(out / EMPTY_EMB, empty)
    index = {
        "_class_name": PIPELINE_CLASS,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["open_clip", "local-dir"],
        "prediction_type": prediction_type,
        "resolution": int(unet.config.sample_size) * _downsample(vae.config),  # pixels, square side
        "latent_shape": [int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size)],
        "scaling_factor": float(vae.config.scaling_factor),
        "text_encoder_info": {
            "source": str(text_encoder_dir),
            "pretrained": text_encoder_pretrained,
            "context_length": encoder.context_length,
            "width": encoder.width,
            "tuned_with_unet": text_state is not None,
        },
        "empty_text_emb": EMPTY_EMB,
        "lineage": lineage or {},
    }
    tmp = out / (MODEL_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, default=str), encoding="utf-8")
    tmp.replace(out / MODEL_INDEX)
    return out


@dataclass
class LdmPipeline:
    """The loaded parts of a pipeline folder, ready for :func:`training.sample.generate`."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    train_scheduler_config: dict  # the DDPMScheduler config of the training schedule
    prediction_type: str
    resolution: int  # pixels, square side of generated images
    empty_emb: torch.Tensor  # (context_length, width) float32 on the pipeline's device
    path: str = ""
    index: dict = field(default_factory=dict)  # model_index.json

    @property
    def device(self) -> torch.device:
        """Where the U-Net lives."""
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent."""
        side = self.resolution // _downsample(self.vae.config)
        return int(self.unet.config.in_channels), side, side


def _scheduler_config(path: Path) -> dict:
    """scheduler/scheduler_config.json as a dict whose step counts are integers; one-line ``ValueError`` else."""
    from pipeline import storage

    file = path / "scheduler" / "scheduler_config.json"
    sched = storage.read_json_object(str(file))
    steps = sched.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{file}: num_train_timesteps is {steps!r}, not a positive integer")
    return sched


def _empty_embedding(file: Path, dev: torch.device) -> torch.Tensor:
    """The stored empty-prompt embedding, a 2-D float array; one-line ``ValueError`` else."""
    try:
        arr = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{file}: not a readable .npy array: {e}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{file}: the empty-prompt embedding is {arr.dtype} of shape {arr.shape}, not 2-D float")
    return torch.from_numpy(arr).float().to(dev)


def _check_parts(path: Path, unet, vae, encoder, empty: torch.Tensor, resolution: int) -> None:
    """One-line ``ValueError`` when the folder's parts do not fit together (a part copied in from another model)."""
    probe = encoder.encode([""])[0]  # (context, width): what the U-Net is conditioned on
    if tuple(empty.shape) != tuple(probe.shape):
        raise ValueError(
            f"{path}: the empty-prompt embedding has shape {tuple(empty.shape)}, the text encoder gives"
            f" {tuple(probe.shape)}: they come from different models"
        )
    if int(unet.config.cross_attention_dim) != probe.shape[-1]:
        raise ValueError(
            f"{path}: the U-Net attends to width {unet.config.cross_attention_dim}, the text encoder gives"
            f" {probe.shape[-1]}: they come from different models"
        )
    if int(unet.config.in_channels) != int(vae.config.latent_channels):
        raise ValueError(
            f"{path}: the U-Net takes {unet.config.in_channels} latent channels, the VAE makes"
            f" {vae.config.latent_channels}"
        )
    step = _downsample(vae.config)
    if resolution % step:  # else the images come out smaller than the resolution says
        raise ValueError(f"{path}: resolution {resolution} is not a multiple of {step}, the VAE's downsampling")


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a pipeline folder: U-Net and VAE in ``dtype`` (eval, channels_last), the fp32 text encoder, the schedule.

    ``device="auto"`` picks CUDA when there is one. Raises ``ValueError`` (one line) when ``path`` is no pipeline
    folder.
    """
    from pipeline.curate.scorer import resolve_device

    path = Path(path)
    if not (path / MODEL_INDEX).is_file():
        raise ValueError(f"{path}: not a pipeline folder (no {MODEL_INDEX})")
    try:
        index = json.loads((path / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: {MODEL_INDEX} is not readable JSON: {e}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: {MODEL_INDEX} is not a JSON object")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{path}: {MODEL_INDEX} is for {index.get('_class_name')!r}, not {PIPELINE_CLASS}")
    empty_name = index.get("empty_text_emb", EMPTY_EMB)
    if not isinstance(empty_name, str) or not empty_name:
        raise ValueError(f"{path}: {MODEL_INDEX}'s empty_text_emb is {empty_name!r}, not a file name")
    missing = [p for p in ("scheduler/scheduler_config.json", empty_name) if not (path / p).is_file()]
    if missing:
        raise ValueError(f"{path}: incomplete pipeline folder (no {', '.join(missing)})")
    resolution = index.get("resolution")
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"{path}: {MODEL_INDEX} has no image resolution (a positive integer)")
    sched = _scheduler_config(path)
    dev = resolve_device(str(device))
    try:
        # low_cpu_mem_usage=False: the plain load, without the warning about the optional `accelerate` package
        kw = {"torch_dtype": dtype, "low_cpu_mem_usage": False}
        unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kw)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of another size than the config
        raise ValueError(f"{path}: cannot load the U-Net/VAE: {str(e).strip().splitlines()[0]}") from e
    unet = unet.to(dev, memory_format=torch.channels_last).eval().requires_grad_(False)
    vae = vae.to(dev, memory_format=torch.channels_last).eval().requires_grad_(False)
    encoder = load_text_encoder(str(path / "text_encoder"), device=str(dev))
    empty = _empty_embedding(path / empty_name, dev)
    _check_parts(path, unet, vae, encoder, empty, resolution)
    return LdmPipeline(
        unet=unet,
        vae=vae,
        text_encoder=encoder,
        train_scheduler_config=sched,
        prediction_type=index.get("prediction_type", sched.get("prediction_type", "epsilon")),
        resolution=int(index["resolution"]),
        empty_emb=empty,
        path=str(path),
        index=index,
    )
