"""Downstream effect of curation: a CLIP trained on the curated pairs against one trained on the unfiltered pairs.

    python benchmarks/curate_downstream.py demo-output/scraped demo-output/curated --heldout demo-output/heldout \
        --config micro-rn --steps 600 --batch-size 128 --lr 0.003 --seeds 0 1 2 --work /tmp/downstream

Both runs use the same recipe (model config, steps, batch, learning rate, seed), so the curated run simply sees
fewer, cleaner pairs for the same number of samples. Each is trained with ``python -m training.train_clip`` and
evaluated at its last step on the held-out shards (the demo recipe's ``heldout``: freshly rendered scenes with
their true captions): zero-shot colour and shape accuracy on the one-shape scenes, and retrieval recall@5. Prints a
markdown table (mean and spread over the seeds) and writes ``WORK/summary.json``. This is DataComp's central
comparison at toy scale; a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("zeroshot_colour", "zeroshot_shape", "image_to_text_R@5", "text_to_image_R@5")


def train(data: str, out: Path, args: argparse.Namespace, seed: int) -> dict:
    """Train one CLIP; its final eval metrics plus the training seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    argv = [sys.executable, "-m", "training.train_clip", data, "--out", str(out), "--config", args.config]
    argv += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", repr(args.lr)]
    argv += ["--seed", str(seed), "--threads", str(args.threads), "--workers", "1", "--save-every", "0"]
    argv += ["--eval-data", args.heldout, "--eval-every", str(args.steps), "--resume", "none", "--no-progress"]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        code = subprocess.call(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"training on {data} exited with {code}; see {out.with_suffix('.log')}")
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    last = m["eval"][-1]
    return {
        **{k: last[k] for k in METRICS},
        "eval_images": last.get("zeroshot_shape_n"),
        "train_seconds": m["train_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": m["train"][-1]["loss"] if m.get("train") else None,
    }


def samples(path: str) -> int:
    """Samples in a dataset directory (its sizes.json)."""
    return sum(json.loads(Path(path, "sizes.json").read_text(encoding="utf-8")).values())


def table(results: dict) -> str:
    """Markdown table: one row per dataset, mean (min-max) of each metric over the seeds."""
    lines = ["| trained on | pairs | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, r in results.items():
        cells = []
        for k in METRICS:
            v = [run[k] for run in r["runs"]]
            cells.append(f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {name} | {r['pairs']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train both arms for every seed and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("unfiltered", help="the scraped (unfiltered) dataset")
    p.add_argument("curated", help="the curated dataset")
    p.add_argument("--heldout", required=True, help="held-out shards with true captions (demo attributes in .json)")
    p.add_argument("--work", required=True)
    p.add_argument("--config", default="micro-rn")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    # the children run in the repository root: relative paths must mean what they meant in the user's directory
    for name in ("unfiltered", "curated", "heldout", "work"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {name: {"data": path, "pairs": samples(path), "runs": []} for name, path in
               (("unfiltered", args.unfiltered), ("curated", args.curated))}  # fmt: skip
    for seed in args.seeds:
        for name, r in results.items():  # alternate the arms so machine noise hits both alike
            run = train(r["data"], work / f"{name}-s{seed}", args, seed)
            r["runs"].append({"seed": seed, **run})
            print(f"[downstream] {name} seed {seed}: {json.dumps(run)}", file=sys.stderr, flush=True)
    summary = {"config": vars(args), "results": results, "table": table(results)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(summary["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
