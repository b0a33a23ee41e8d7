"""``altforge train clip`` runs the trainer and leaves a model open_clip loads; bad input is one line."""

import os
import subprocess
import sys

from tests.flows.test_scrape_flow import ROOT
from training.synthetic import write_demo_shards


def test_train_clip_from_the_cli(tmp_path):
    data = tmp_path / "data"
    write_demo_shards(str(data), n=48, per_shard=24, size=32)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "train", "clip", str(data), "--out", str(run), "--config", "micro"]
    p = subprocess.run(
        [*cmd, "--steps", "2", "--batch-size", "8", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (run / "metrics.json").exists()


def test_train_clip_bad_input_is_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "clip", str(tmp_path / "nope"), "--out", str(tmp_path / "r")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_train_steps_zero_is_refused_not_dropped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "vae", str(data), "--out", str(tmp_path / "r"), "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --steps must be at least 1, got 0"]
    assert not (tmp_path / "r").exists()  # nothing started


def test_ranks_failing_under_torchrun_end_in_their_own_lines_not_torchruns_report(tmp_path):
    (tmp_path / "empty").mkdir()  # exists, so the CLI hands it to the ranks, which find no shards
    cmd = [sys.executable, "-m", "flows.cli", "train", "ldm", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
    p = subprocess.run(
        [*cmd, "--steps", "2", "--nproc-per-node", "2", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not set(ln) <= {"*"} and "OMP_NUM_THREADS" not in ln]
    assert p.returncode == 2 and "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    assert lines.count(f"error: no shards found in {tmp_path / 'empty'}") == 2  # one per rank
    assert lines[-1] == "error: 2 rank(s) failed (exit code 2); their own errors are above" and len(lines) == 3
