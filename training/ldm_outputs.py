"""What the diffusion trainer writes besides checkpoints: log rows, the grids at fixed prompts, the pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from training import distributed
from training.loop import window_row, write_json
from training.models.pipeline import default_scheduler_config
from training.objectives import NUM_TRAIN_TIMESTEPS

if TYPE_CHECKING:
    from training.train_ldm import LdmTrainConfig

N_BUCKETS = 4  # the loss is also logged per timestep quarter: t in [0, 250), [250, 500), ...


def sampling_pipeline(ema, vae, encoder, empty: torch.Tensor, prediction: str):
    """An in-memory :class:`~training.models.pipeline.LdmPipeline` around the EMA U-Net, for the grids (moves ``vae``
    to ``empty``'s device)."""
    from training.models.pipeline import LdmPipeline
    from training.models.vae import downsample_factor

    vae = vae.to(empty.device)
    side = int(ema.config.sample_size)
    return LdmPipeline(
        ema,
        vae,
        encoder,
        default_scheduler_config(prediction),
        prediction,
        side * downsample_factor(vae.config),
        empty,
    )


def log_sample_grid(writer, step: int, pipe, cfg: LdmTrainConfig, out: Path) -> dict:
    """Generate the fixed prompts (prompt i with seed i) with the EMA U-Net; log the grid and save it as a PNG.

    A grid that comes out NaN or infinite (a reduced-precision overflow while sampling) is skipped with one line:
    a preview does not end a run whose own loss and weights are finite (the divergence probe looked at them).
    """
    from training.sample import NonFiniteOutputError, generate, make_grid, save_grid

    try:
        images = generate(pipe, list(cfg.sample_prompts), steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=0)
    except NonFiniteOutputError as e:
        print(f"step {step}: sample grid skipped: {e}", flush=True)
        return {"step": step, "skipped": str(e)}
    meta = dict(
        prompts=list(cfg.sample_prompts),
        seed=0,
        steps=cfg.sample_steps,
        guidance=cfg.sample_guidance,
        scheduler="dpm",
        train_step=step,
    )
    path = save_grid(images, out / "samples" / f"step_{step:08d}.png", meta)
    writer.add_image("samples", np.asarray(make_grid(images)), step, dataformats="HWC")
    return {"step": step, "path": str(path.relative_to(out))}


def export_model(
    out: Path,
    ema,
    vae,
    te_model,
    te_pretrained,
    empty,
    cfg: LdmTrainConfig,
    lineage: dict,
    text_state: dict | None = None,
) -> str:
    """Write the pipeline folder (EMA U-Net) at the top of ``out``; only ``unet/`` and ``scheduler/`` without a VAE.

    ``vae``: the loaded AutoencoderKL, or None. ``text_state``: the tuned text tower's weights
    (``--train-text-encoder``), written over the copied tower's."""
    if vae is not None and te_model:
        from training.models.pipeline import save_pipeline

        sched = default_scheduler_config(cfg.prediction)
        save_pipeline(
            out, ema, vae, te_model, sched, cfg.prediction, lineage, te_pretrained, empty.cpu(), text_state=text_state
        )
        return "pipeline"
    print("no VAE or text encoder known (--vae / --text-encoder, or the latent manifest): writing unet/ only")
    ema.save_pretrained(str(out / "unet"), safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    write_json(out / "scheduler" / "scheduler_config.json", default_scheduler_config(cfg.prediction))
    return "unet"


def log_row(window: dict, step: int, lr: float, global_batch: int, train_seconds: float, dist) -> dict:
    """One log row from a window of steps: loss (all ranks), loss per timestep bucket, samples/s, data-wait share."""
    row = window_row(window, step, lr, global_batch, train_seconds, dist.device)
    sums = distributed.all_gather_object((window["sum"].tolist(), window["n"].tolist()))
    width = NUM_TRAIN_TIMESTEPS // N_BUCKETS
    for b in range(N_BUCKETS):
        n = sum(s[1][b] for s in sums)
        if n > 0:
            row[f"loss_t{b * width:03d}_{(b + 1) * width - 1:03d}"] = sum(s[0][b] for s in sums) / n
    return row
