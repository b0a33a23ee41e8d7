"""The whole latent-diffusion chain on a CPU budget: VAE training -> encode -> U-Net training -> evaluate_ldm.

    python benchmarks/ldm_quality.py demo-output/curated --clip demo-output/clip --heldout demo-output/heldout \
        --work /tmp/ldm-quality --vae-seconds 150 --ldm-seconds 450 --threads 2

Each stage runs as its own process through the project's command lines (``python -m training.train_vae``,
``python -m flows.encode``, ``python -m training.train_ldm``, ``python -m training.evaluate_ldm``), so the
numbers are what a user of those commands gets. The time budget is split with ``--vae-seconds`` and
``--ldm-seconds`` (each trainer's ``--max-minutes``: training time, start-up and evaluation excluded); the step
counts set the learning-rate schedules, so pick them to end near the budget (a trainer stops early, mid-cosine,
when its budget runs out). ``--skip-vae DIR`` reuses a trained VAE. Prints one JSON summary (also written to
``WORK/summary.json``): PSNR, steps/s, training seconds, judge and CLIP accuracy unguided vs guided at every
step count, CLIP Frechet distance, the negative-prompt ratios and the issue-7 checks. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_stage(name: str, argv: list[str], log: Path, threads: int) -> float:
    """Run ``python -m ...`` in the repository root with its output in ``log``; wall seconds (raises on failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    print(f"[ldm_quality] {name}: {' '.join(argv)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        code = subprocess.call([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = log.read_text(encoding="utf-8").splitlines()[-15:]
        raise SystemExit(f"{name} exited with {code} after {seconds:.0f}s; {log}:\n" + "\n".join(tail))
    return seconds


def train_vae(args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    """Train the VAE (or reuse ``--skip-vae``); its folder and summary numbers."""
    if args.skip_vae:
        metrics = json.loads((Path(args.skip_vae) / "metrics.json").read_text(encoding="utf-8"))
        return args.skip_vae, {"reused": args.skip_vae, **vae_numbers(metrics)}
    out = work / "vae"
    argv = ["-m", "training.train_vae", args.data, "--out", str(out), "--config", args.vae_config]
    argv += ["--resolution", str(args.resolution), "--steps", str(args.vae_steps), "--batch-size", str(args.vae_batch)]
    argv += ["--lr", repr(args.vae_lr), "--max-minutes", repr(args.vae_seconds / 60), "--threads", str(args.threads)]
    argv += ["--workers", str(args.workers), "--save-every", "0", "--sample-every", "0", "--no-progress"]
    argv += ["--resume", "none", "--seed", str(args.seed)]
    if args.heldout:
        argv += ["--eval-data", args.heldout]
    wall = run_stage("train_vae", argv, work / "train_vae.log", args.threads)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return str(out), {"wall_seconds": round(wall, 1), **vae_numbers(metrics)}


def vae_numbers(m: dict) -> dict:
    """The VAE run's headline numbers from its metrics.json."""
    rows = m.get("train") or [{}]
    steps, seconds = m.get("step"), m.get("train_seconds")
    return {
        "steps": steps,
        "train_seconds": seconds,
        "steps_per_s": round(steps / seconds, 2) if steps and seconds else None,
        "heldout_psnr_db": m.get("psnr"),
        "psnr_by_time": [(e["train_seconds"], round(e["psnr"], 2)) for e in m.get("eval", [])],
        "train_psnr_db_last_window": rows[-1].get("psnr"),
        "scaling_factor": m.get("scaling_factor"),
        "config": {k: m["config"][k] for k in ("config", "batch_size", "lr", "loss", "kl_weight", "steps", "threads")},
    }


def encode(args: argparse.Namespace, work: Path, vae: str) -> tuple[str, dict]:
    """Encode the image dataset into latents + per-sample text embeddings."""
    out = work / "latents"
    argv = ["-m", "flows.encode", args.data, "--out", str(out), "--vae", vae, "--text-encoder", args.clip]
    argv += ["--resolution", str(args.resolution), "--device", "cpu"]
    wall = run_stage("encode", argv, work / "encode.log", args.threads)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return str(out), {"wall_seconds": round(wall, 1), "latents": manifest.get("samples")}


def train_ldm(args: argparse.Namespace, work: Path, latents: str, vae: str) -> tuple[str, dict]:
    """Train the U-Net and write the pipeline folder."""
    out = work / "ldm"
    argv = ["-m", "training.train_ldm", latents, "--out", str(out), "--config", args.unet_config]
    argv += ["--steps", str(args.ldm_steps), "--batch-size", str(args.ldm_batch), "--lr", repr(args.ldm_lr)]
    argv += ["--max-minutes", repr(args.ldm_seconds / 60), "--threads", str(args.threads)]
    argv += ["--workers", str(args.workers), "--save-every", "0", "--no-progress", "--resume", "none"]
    argv += ["--text-encoder", args.clip, "--vae", vae, "--seed", str(args.seed)]
    wall = run_stage("train_ldm", argv, work / "train_ldm.log", args.threads)
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    steps, seconds = m["step"], m["train_seconds"]
    rows = m.get("train") or [{}]
    numbers = {
        "wall_seconds": round(wall, 1),
        "steps": steps,
        "train_seconds": seconds,
        "steps_per_s": round(steps / seconds, 2) if seconds else None,
        "loss_last_window": rows[-1].get("loss"),
        "unet_parameters": m.get("unet_parameters"),
        "config": {k: m["config"][k] for k in ("config", "batch_size", "lr", "steps", "ema_decay", "cond_dropout")},
    }
    return str(out), numbers


def evaluate(args: argparse.Namespace, work: Path, model: str) -> dict:
    """Run training.evaluate_ldm on the pipeline folder; the report's headline numbers."""
    report_path = work / "report.json"
    argv = ["-m", "training.evaluate_ldm", model, "--out", str(report_path), "--threads", str(args.threads)]
    argv += ["--steps", *map(str, args.eval_steps), "--guidance", *map(str, args.guidance)]
    argv += ["--n-per-prompt", str(args.n_per_prompt), "--grids", str(work / "grids")]
    if args.judge and Path(args.judge, "judge_config.json").is_file():
        argv += ["--judge", args.judge]
    elif args.judge:
        argv += ["--save-judge", args.judge]
    wall = run_stage("evaluate_ldm", argv, work / "evaluate.log", args.threads)
    return summarize_report(json.loads(report_path.read_text(encoding="utf-8")), wall)


def summarize_report(r: dict, wall: float) -> dict:
    """Accuracy per (guidance, steps), Frechet distances, the VAE and real references, negatives, checks."""
    sweep = r["sweep"]
    settings = {}
    for row in sweep["settings"]:
        key = f"g{row['guidance']:g}_s{row['steps']}"
        settings[key] = {
            "judge_colour": row["judge"]["colour"],
            "judge_shape": row["judge"]["shape"],
            "judge_both": row["judge"]["both"],
            "clip_zeroshot": row.get("clip_zeroshot"),
            "frechet_clip": row.get("frechet_clip"),
        }
    real = sweep["real"]
    vae_ref = real["judge_on_vae_reconstructions"]
    negative = {c: v.get("pixel_share_ratio") for c, v in r["negative"]["colours"].items()}
    return {
        "wall_seconds": round(wall, 1),
        "judge_trusted": r["judge"]["trusted"],
        "judge_on_real_heldout": {"colour": real["judge"]["colour"], "shape": real["judge"]["shape"]},
        "judge_on_vae_reconstructions": {k: vae_ref[k] for k in ("colour", "shape", "both", "psnr_db")},
        "frechet_clip_real_vs_real": real.get("frechet_clip_real_vs_real"),
        "settings": settings,
        "negative_pixel_share_ratio": negative,
        "negative_mean_ratio": r["negative"].get("mean_pixel_share_ratio"),
        "checks": r["checks"],
        "images_per_setting": sweep["images_per_setting"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="curated image dataset (shards with captions)")
    p.add_argument("--clip", required=True, help="CLIP run dir whose text tower conditions the U-Net")
    p.add_argument("--heldout", default=None, help="held-out image shards for the VAE's PSNR")
    p.add_argument("--work", required=True, help="directory for the runs, logs, report and summary")
    p.add_argument("--resolution", type=int, default=32, help="px")
    p.add_argument("--vae-config", default="tiny")
    p.add_argument("--vae-seconds", type=float, default=150.0, help="VAE training-time budget")
    p.add_argument("--vae-steps", type=int, default=800, help="VAE schedule length (optimizer steps)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--skip-vae", default=None, help="reuse this trained VAE folder instead of training one")
    p.add_argument("--unet-config", default="tiny")
    p.add_argument("--ldm-seconds", type=float, default=450.0, help="U-Net training-time budget")
    p.add_argument("--ldm-steps", type=int, default=2000, help="U-Net schedule length (optimizer steps)")
    p.add_argument("--ldm-batch", type=int, default=64)
    p.add_argument("--ldm-lr", type=float, default=1e-3)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 7.5])
    p.add_argument("--n-per-prompt", type=int, default=4, help="images per held-out prompt and setting")
    p.add_argument("--judge", default=None, help="judge dir: loaded when it exists, else the trained one is saved")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per trainer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # the stages run in the repository root: relative paths must mean what they meant in the user's directory
    for name in ("data", "heldout", "work", "skip_vae", "judge"):
        if getattr(args, name) is not None:
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if os.path.exists(args.clip):  # a directory; anything else (an open_clip name) passes through as given
        args.clip = os.path.abspath(args.clip)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chain and print the JSON summary."""
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vae, vae_summary = train_vae(args, work)
    latents, enc = encode(args, work, vae)
    model, ldm = train_ldm(args, work, latents, vae)
    summary = {
        "threads": args.threads,
        "vae": vae_summary,
        "encode": enc,
        "ldm": ldm,
        "training_seconds": round((vae_summary.get("train_seconds") or 0) + ldm["train_seconds"], 1),
        "evaluation": evaluate(args, work, model),
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
