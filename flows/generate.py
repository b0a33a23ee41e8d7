"""The generate stage of recipe_flow: the recipe's evaluation grid and, on demo recipes, a quick evaluation."""

from __future__ import annotations

import json
import os

from flows import env  # noqa: F401  (before prefect)

# The demo's quick evaluation (the full sweep is `python -m training.evaluate_ldm`): unguided vs the recipe's
# guidance at its step count, 2 images per held-out prompt, 8 per colourless prompt for the negative check.
QUICK_EVAL = {"n_per_prompt": 2, "negative_n": 8, "n_real": 1}


def evaluation_grid(model_dir: str, gen: dict, out_png: str, evaluate_with: dict | None = None) -> dict:
    """Sample ``gen``'s prompts into a PNG grid; with ``evaluate_with``, add prompt accuracy and the negative check.

    ``gen`` is the recipe's generate section (prompts, negative, steps, guidance, seed, n, scheduler).
    """
    from training.models.pipeline import load_pipeline
    from training.sample import check_seeds, generate, grid_meta, save_grid

    check_seeds(gen["seed"], len(gen["prompts"]) * gen["n"])  # before the model loads
    pipe = load_pipeline(model_dir, device="auto")  # as `altforge generate`: the GPU when there is one
    images = generate(
        pipe,
        gen["prompts"],
        negative=gen.get("negative"),
        steps=gen["steps"],
        guidance=gen["guidance"],
        seed=gen["seed"],
        n=gen["n"],
        scheduler=gen.get("scheduler", "dpm"),
        guidance_interval=_interval(gen),
    )
    meta = grid_meta(
        list(gen["prompts"]),
        negative=gen.get("negative"),
        seed=gen["seed"],
        steps=gen["steps"],
        guidance=gen["guidance"],
        guidance_interval=_interval(gen),
        scheduler=gen.get("scheduler", "dpm"),
        n=gen["n"],
        precision="auto",
        model=model_dir,
    )
    save_grid(images, out_png, meta, cols=gen["n"])
    metrics = {"images": int(images.shape[0]), "grid": out_png}
    if evaluate_with:
        metrics.update(quick_evaluation(pipe, gen, evaluate_with, os.path.dirname(out_png)))
    return metrics


def _interval(gen: dict) -> tuple[int, int] | None:
    """The generate section's guidance interval as a (lo, hi) tuple; None = guidance at every step."""
    iv = gen.get("guidance_interval")
    return None if iv is None else (int(iv[0]), int(iv[1]))


def quick_evaluation(pipe, gen: dict, evaluate_with: dict, out_dir: str) -> dict:
    """Prompt accuracy (judge and CLIP) unguided and guided, the negative-prompt check; the full report as JSON."""
    from training.evaluate_ldm import LdmEvalConfig, evaluate_pipeline, load_clip_judge
    from training.judge import JudgeConfig, train_judge

    judge = train_judge(JudgeConfig(size=pipe.resolution))
    clip = load_clip_judge(evaluate_with["clip"], device="auto") if evaluate_with.get("clip") else None
    cfg = LdmEvalConfig(
        guidances=(1.0, float(gen["guidance"])),
        steps=(int(gen["steps"]),),
        scheduler=gen.get("scheduler", "dpm"),
        negative_steps=int(gen["steps"]),
        negative_guidance=float(gen["guidance"]),
        guidance_interval=_interval(gen),
        target_guidance=float(gen["guidance"]),
        **QUICK_EVAL,
    )
    report = evaluate_pipeline(pipe, judge, cfg, clip=clip)
    path = os.path.join(out_dir, "evaluation.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    out = {"evaluation": path, "judge_trusted": report["judge"]["trusted"]}
    for row in report["sweep"]["settings"]:
        tag = f"g{row['guidance']:g}"
        out[f"colour_acc_{tag}"] = round(row["judge"]["colour"], 3)
        out[f"shape_acc_{tag}"] = round(row["judge"]["shape"], 3)
    ratio = report["negative"].get("mean_pixel_share_ratio")
    out["negative_colour_share_ratio"] = None if ratio is None else round(ratio, 3)
    return out
