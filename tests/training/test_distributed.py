"""DDP on CPU: 2 gloo processes under torchrun reach the weights of 1 process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import in_netns
from training.distributed import init_distributed
from training.synthetic import write_demo_shards

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: str) -> None:
    """``args`` in a fresh process, on loopback only (see ``in_netns``); fails the test on a non-zero exit."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": cwd}
    proc = subprocess.run(in_netns(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_gloo_processes_match_one(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = tmp_path / "data"
    write_demo_shards(str(data), 96, seed=2, size=32, per_shard=24, mismatch_rate=0.2)
    # split="sample" without a shuffle buffer: a global batch holds the same samples on 1 rank or 2
    common = [
        "--config",
        "micro",
        "--steps",
        "4",
        "--warmup-steps",
        "1",
        "--lr",
        "3e-3",
        "--workers",
        "0",
        "--split",
        "sample",
        "--shuffle-buffer",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--log-every",
        "1",
    ]
    trainer = ["-m", "training.train_clip", str(data)]
    run([sys.executable, *trainer, "--out", str(tmp_path / "one"), "--batch-size", "16", *common], repo)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
    run([*torchrun, *trainer, "--out", str(tmp_path / "two"), "--batch-size", "8", *common], repo)
    one = load_file(str(tmp_path / "one" / "open_clip_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "open_clip_model.safetensors"))
    for k in one:  # Adam's first steps amplify float summation-order noise in near-zero gradients: small atol
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-5), (k, float((one[k] - two[k]).abs().max()))
    losses = [
        [r["loss"] for r in json.loads((tmp_path / d / "metrics.json").read_text())["train"]] for d in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert len(set(losses[0])) == 4  # four different batches were trained on
    # the 2-rank checkpoint holds both ranks' data positions
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert all(d["batches"] == 4 for d in state["data"])
    # a time box: rank 0's clock decides, so both ranks stop after the same step (else DDP would hang)
    boxed = [*common, "--steps", "100000", "--max-minutes", "0.003", "--batch-size", "8"]
    run([*torchrun, *trainer, "--out", str(tmp_path / "boxed"), *boxed], repo)
    metrics = json.loads((tmp_path / "boxed" / "metrics.json").read_text())
    assert 0 < metrics["step"] < 100000
    state = json.loads((tmp_path / "boxed" / "checkpoints" / f"step_{metrics['step']:08d}" / "state.json").read_text())
    assert [d["batches"] for d in state["data"]] == [metrics["step"]] * 2


def test_single_process_without_torchrun_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device.type == "cpu"


def test_unknown_or_missing_devices_are_one_line_errors(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for device in ("gpu", "bogus", "cuda:", "CPU"):
        with pytest.raises(ValueError, match="unknown device") as err:
            init_distributed(device)
        assert "\n" not in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA device") as err:
            init_distributed(device)
        assert "\n" not in str(err.value)
    assert init_distributed("auto").device.type == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun each rank takes its own GPU: cuda:N is refused
    with pytest.raises(ValueError, match="under torchrun use cuda"):
        init_distributed("cuda:1")
