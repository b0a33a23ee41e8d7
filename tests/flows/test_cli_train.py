"""``altforge train clip`` runs the trainer and leaves a model open_clip loads; bad input is one line."""

import os
import re
import subprocess
import sys

from tests.conftest import in_netns, without_torch_warnings
from tests.flows.test_scrape_flow import ROOT
from training.synthetic import write_demo_shards


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``altforge ARGS`` in a fresh process (one torch thread per process, on loopback only), its output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = in_netns([sys.executable, "-m", "flows.cli", *args])  # torchrun's c10d would ask the resolver otherwise
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_train_clip_from_the_cli(tmp_path):
    data = tmp_path / "data"
    write_demo_shards(str(data), n=48, per_shard=24, size=32)
    run = tmp_path / "run"
    p = cli("train", "clip", str(data), "--out", str(run), "--config", "micro", "--steps", "2", "--batch-size", "8",
            "--workers", "0")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run}")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (run / "metrics.json").exists()


def test_train_clip_bad_input_is_one_line(tmp_path):
    p = cli("train", "clip", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_help_shows_the_trainers_flags_and_the_launcher_options():
    for args, own in ((["train", "ldm"], "--prediction"), (["train", "vae"], "--kl-weight"), (["encode"], "--vae")):
        p = cli(*args, "--help", timeout=120)
        assert p.returncode == 0 and own in p.stdout, p.stderr[-2000:]
        assert all(f in p.stdout for f in ("--nproc-per-node", "--nnodes", "--rdzv-endpoint")), p.stdout


def test_train_steps_zero_is_refused_not_dropped(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    p = cli("train", "vae", str(data), "--out", str(tmp_path / "r"), "--steps", "0", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --steps must be at least 1, got 0"]
    assert not (tmp_path / "r").exists()  # nothing started


def test_ranks_failing_under_torchrun_end_in_their_own_lines_not_torchruns_report(tmp_path):
    (tmp_path / "empty").mkdir()  # exists, so the CLI hands it to the ranks, which find no shards
    args = ["train", "ldm", str(tmp_path / "empty"), "--out", str(tmp_path / "r"), "--steps", "2"]
    p = cli(*args, "--nproc-per-node", "2", "--workers", "0")
    # less torch's own lines: the OMP_NUM_THREADS banner, and c10d's warning that it cannot name a peer in the netns
    lines = [ln for ln in without_torch_warnings(p.stderr) if not set(ln) <= {"*"} and "OMP_NUM_THREADS" not in ln]
    assert p.returncode == 2 and "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    assert lines.count(f"error: no shards found in {tmp_path / 'empty'}") == 2  # one per rank
    assert re.fullmatch(r"error: rank [01] failed \(exit code 2\); its own error is above", lines[-1])
    assert len(lines) == 3


def failure_entry(n: int, rank: int, code: int) -> str:
    return (
        f"[{n}]:\n  time      : 2026-11-28_01:00:12\n  host      : localhost\n"
        f"  rank      : {rank} (local_rank: {rank})\n  exitcode  : {code} (pid: {18036 + rank})\n  error_file: <N/A>\n"
    )


# torchrun's ChildFailedError table: rank 0 stopped by torchrun (SIGTERM) after rank 1 was killed (SIGKILL)
RULE, LINE = "=" * 60, "-" * 60
REPORT = (
    f"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n{RULE}\ntraining.train_ldm FAILED\n{LINE}\n"
    f"Failures:\n{failure_entry(1, 0, -15)}{LINE}\n"
    f"Root Cause (first observed failure):\n{failure_entry(0, 1, -9)}{RULE}\n"
)


def test_a_rank_killed_by_a_signal_is_named_with_it(capsys):
    from flows.cli_train import _summarise_failure

    assert _summarise_failure(REPORT, 1) == 128 + 9
    assert capsys.readouterr().err == "error: rank 1 was killed by SIGKILL (out of memory?)\n"
    assert _summarise_failure(REPORT.replace("-9 (pid", "3 (pid"), 1) == 3
    assert capsys.readouterr().err == "error: rank 1 failed (exit code 3); its own error is above\n"
