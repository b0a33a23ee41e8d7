"""The quick run that test_ldm_quality judges: demo scenes -> tiny VAE -> latents with the text states of a frozen,
untrained micro CLIP tower -> tiny U-Net (800 steps). About five minutes of one core.

tests/conftest.py starts it in a background process as the session begins (when test_ldm_quality is selected), so
it trains on the core the rest of the suite leaves idle; the test builds it in-process when it was not started.
``python -m tests.training.ldm_quick_run DIR`` builds it into DIR and writes DIR/done last.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

DONE = "done"
TEST_FILE = "tests/training/test_ldm_quality.py"
_STATE = pytest.StashKey[dict]()
_ROOT = Path(__file__).resolve().parents[2]


def start(session) -> None:
    """Build the quick run in a background process (at a lower priority than the tests) when its test is selected."""
    if session.config.option.collectonly or not any(i.nodeid.startswith(TEST_FILE) for i in session.items):
        return
    root = Path(tempfile.mkdtemp(prefix="altforge-ldmq-"))
    log = open(root / "build.log", "w", encoding="utf-8")  # noqa: SIM115 (closed in wait or stop)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.training.ldm_quick_run", str(root / "run")],
        cwd=_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        preexec_fn=lambda: os.nice(5),
    )
    session.config.stash[_STATE] = {"root": root, "proc": proc, "log": log}


def wait(config) -> Path | None:
    """The background build's folder once it has finished (a failed build fails the test with its log's tail);
    None when none was started."""
    state = config.stash.get(_STATE, None)
    if state is None:
        return None
    proc = state["proc"]
    proc.wait(timeout=3600)
    state["log"].close()
    run = state["root"] / "run"
    if proc.returncode != 0 or not (run / DONE).is_file():
        tail = (state["root"] / "build.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        pytest.fail(f"the background quick run failed (exit status {proc.returncode}):\n{tail}")
    return run


def stop(session) -> None:
    """End the background build if still running, and remove its folder."""
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    if state["proc"].poll() is None:
        state["proc"].kill()
        state["proc"].wait()
    state["log"].close()
    shutil.rmtree(state["root"], ignore_errors=True)


def build(root: Path) -> None:
    import torch

    from flows.encode import ModelRefs, load_encoders
    from pipeline.latents import EncodeConfig, encode_dataset
    from training.models import create_clip, export_open_clip, model_config
    from training.synthetic import write_demo_shards
    from training.train_ldm import LdmTrainConfig
    from training.train_ldm import train as train_ldm
    from training.train_vae import VaeTrainConfig
    from training.train_vae import train as train_vae

    root.mkdir(parents=True, exist_ok=True)
    write_demo_shards(str(root / "images"), 1200, seed=0, size=32, p_two=0.0, per_shard=1200)
    torch.manual_seed(0)
    export_open_clip(create_clip("micro"), model_config("micro"), root / "clip")  # frozen, untrained: L=16, D=32
    vae_cfg = VaeTrainConfig(
        data=str(root / "images"),
        out=str(root / "vae"),
        steps=600,
        batch_size=16,
        lr=2e-3,
        warmup_steps=20,
        workers=1,
        save_every=0,
        sample_every=0,
        scale_samples=256,
        log_every=100,
        threads=2,  # the VAE's convolutions gain from a second thread (76 s against 101 s), the tiny U-Net's do not
        progress=False,
    )
    train_vae(vae_cfg)
    loaded = load_encoders(ModelRefs(str(root / "vae"), str(root / "clip"), None, "cpu"), "float32")
    enc = EncodeConfig(resolution=32, batch_size=128)
    encode_dataset(
        str(root / "images"), str(root / "latents"), enc, loaded.encoders, loaded.config(enc), loaded.text.empty()
    )
    ldm_cfg = LdmTrainConfig(
        data=str(root / "latents"),
        out=str(root / "ldm"),
        text_encoder=str(root / "clip"),
        vae=str(root / "vae"),
        steps=800,
        batch_size=64,
        lr=2e-3,
        warmup=20,
        workers=1,
        save_every=0,
        log_every=100,
        threads=1,
        progress=False,
    )
    train_ldm(ldm_cfg)
    (root / DONE).write_text("ok\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
