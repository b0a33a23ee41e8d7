"""Training launches: the printed torchrun command and sbatch script, and real 2-process CPU launches (gloo)."""

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest
from prefect import flow

from flows import launch
from flows.launch import (
    LOG_MARK,
    LaunchError,
    check_options,
    launch_training,
    option_flags,
    print_launch,
    run_paths,
    trainer_args,
)
from pipeline.recipe import TrainRun, parse_recipe
from tests.conftest import in_netns
from tests.flows.test_scrape_flow import ROOT
from training.synthetic import write_demo_shards

MULTI_NODE = {
    "name": "big",
    "output": "/data/big",
    "sources": [{"kind": "demo_site"}],
    "train": [
        {"kind": "vae", "config": "tiny", "steps": 50, "nproc_per_node": 1},
        {
            "kind": "clip",
            "config": "ViT-B-32",
            "steps": 1000,
            "batch_size": 256,
            "lr": 0.0005,
            "max_minutes": 30,
            "nproc_per_node": 8,
            "nnodes": 2,
            "rdzv_endpoint": "node0:29400",
        },
    ],
}
TRAINER_ARGS = [
    "-m",
    "training.train_clip",
    "/data/big/scraped",
    "--out",
    "/data/big/clip",
    "--config",
    "ViT-B-32",
    "--steps",
    "1000",
    "--batch-size",
    "256",
    "--lr",
    "0.0005",
    "--max-minutes",
    "30.0",
    # what `altforge run` adds: checkpoints, no progress bar, the demo recipe's held-out scenes
    "--save-every",
    "200",
    "--no-progress",
    "--workers",
    "1",
    "--warmup-steps",
    "100",
    "--eval-data",
    "/data/big/heldout",
    "--eval-every",
    "250",
]


def command_words(text: str) -> list[str]:
    """The words of the one shell command in ``text`` (comments dropped, line continuations joined)."""
    return shlex.split(text.replace("\\\n", " "), comments=True)


def test_printed_torchrun_for_a_multi_node_recipe():
    text = print_launch(parse_recipe(MULTI_NODE), "torchrun", kind="clip")
    assert text.startswith("# big: clip training, 2 x 8 processes; run on each of the 2 nodes\n")
    assert command_words(text) == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400",
        "--rdzv-id=big-clip",
        *TRAINER_ARGS,
    ]


def test_printed_torchrun_for_one_node_stays_on_loopback(tmp_path):
    recipe = parse_recipe({**MULTI_NODE, "output": str(tmp_path)})
    words = command_words(print_launch(recipe, "torchrun", kind="vae", out="/elsewhere"))
    assert words[:7] == [
        "torchrun",
        "--nnodes=1",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        "--rdzv-id=big-vae",
    ]
    # no curate stage in this recipe: `altforge run` trains the VAE on the scrape, and so does the printed command
    assert words[7:] == ["-m", "training.train_vae", "/elsewhere/scraped", "--out", "/elsewhere/vae"] + [
        "--config",
        "tiny",
        "--steps",
        "50",
        # no batch size or learning rate in the recipe: the trainer's defaults, as `altforge train vae` gets
        "--save-every",
        "100",
        "--no-progress",
        "--workers",
        "1",
        "--eval-data",
        "/elsewhere/heldout",
    ]


def test_bad_launch_requests_are_one_line():
    recipe = parse_recipe(MULTI_NODE)
    with pytest.raises(ValueError, match="has no 'ldm' training run"):
        print_launch(recipe, "torchrun", kind="ldm")
    with pytest.raises(ValueError, match="--print must be torchrun or slurm"):
        print_launch(recipe, "mpirun", kind="clip")
    no_endpoint = {**MULTI_NODE, "train": [{"kind": "clip", "config": "micro", "steps": 1, "nnodes": 2}]}
    with pytest.raises(ValueError, match="nnodes 2 needs rdzv_endpoint"):
        print_launch(parse_recipe(no_endpoint), "torchrun")


def fake_tool(bin_dir, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_script_gives_each_node_its_slurm_rank(tmp_path):
    script = print_launch(parse_recipe(MULTI_NODE), "slurm", kind="clip")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=altforge-big-clip",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --output=altforge-big-clip-%j.log",
    ]
    # Run the script as Slurm would, with stand-ins for scontrol, srun (one task per node) and torchrun.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tool(bin_dir, "scontrol", 'test "$1 $2 $3" = "show hostnames gpu[07-08]" && printf "gpu07\\ngpu08\\n"\n')
    fake_tool(
        bin_dir,
        "srun",
        """\
        while [[ "$1" == --* ]]; do shift; done
        for node in 0 1; do SLURM_NODEID=$node "$@" || exit 1; done
        """,
    )
    fake_tool(bin_dir, "torchrun", 'printf "%s\\n" "$@" > "$CALLS/node$SLURM_NODEID"\n')
    (tmp_path / "calls").mkdir()
    job = tmp_path / "job.sh"
    job.write_text(script)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(tmp_path / "calls"),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
    }
    p = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    for node in (0, 1):
        argv = (tmp_path / "calls" / f"node{node}").read_text().splitlines()
        assert argv == [
            "--nnodes=2",
            "--nproc-per-node=8",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=gpu07:29400",
            "--rdzv-id=4242",
            *TRAINER_ARGS,
        ]


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """Trainer subprocesses: one thread each, gloo on loopback, and the test's helper module importable."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), ROOT]))
    monkeypatch.chdir(ROOT)
    # torchrun's c10d looks up its peers' names (a DNS query off loopback): launch it in its own network namespace
    monkeypatch.setattr(launch, "TORCHRUN", tuple(in_netns(list(launch.TORCHRUN))))


@pytest.fixture
def shards(tmp_path):
    data = tmp_path / "data"
    write_demo_shards(str(data), n=64, per_shard=32, size=32)
    return str(data)


# Stands in for a node failure: the first attempt trains to a checkpoint at step 2, then every rank exits 3.
CRASH_ONCE = """\
import sys
from pathlib import Path

from training.train_clip import main

argv = sys.argv[1:]
out = Path(argv[argv.index("--out") + 1])
first_attempt = not (out / "checkpoints" / "latest").exists()  # read before any rank can have saved
code = main(argv + ["--stop-after", "2"] if first_attempt else argv)
sys.exit(3 if first_attempt else code)
"""

TINY = ["--workers", "0", "--log-every", "1", "--warmup-steps", "1", "--save-every", "0"]


@flow(name="launch-test")
def train_flow(run: TrainRun, data: str, run_dir: str, module: str | None = None) -> dict:
    """Launch one training run through the task, with one retry and no delay."""
    return launch_training.with_options(retries=1, retry_delay_seconds=0)(run, data, run_dir, TINY, module)


def attempts(log: str) -> list[tuple[str, str, str]]:
    """(start line, output, end line) of each launch attempt in a launch.log."""
    out = []
    for chunk in log.split(f"{LOG_MARK} ")[1:]:
        first, _, rest = chunk.partition("\n")
        if " start: " in first:
            out.append([first, rest, ""])
        else:
            out[-1][2] = first
    return [tuple(a) for a in out]


def test_two_process_launch_through_the_flow(tmp_path, shards, launch_env):
    run = TrainRun(kind="clip", config="micro", steps=3, batch_size=8, nproc_per_node=2)
    run_dir = tmp_path / "run"
    metrics = train_flow(run, shards, str(run_dir))

    assert metrics["step"] == 3
    # both ranks trained and checkpointed their data positions
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["world_size"] == 2
    assert [d["batches"] for d in state["data"]] == [3, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert (run_dir / "open_clip_model.safetensors").is_file()
    ((start, output, end),) = attempts((run_dir / "launch.log").read_text())
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d" in start
    # each worker is this interpreter without -u (torchrun's --no-python), so its stderr writes whole lines
    assert f"--no-python {sys.executable} -m training.train_clip" in start
    assert "step=3 " in output
    assert end.endswith("end: exited with code 0")


def test_retried_launch_resumes_from_the_checkpoint(tmp_path, shards, launch_env):
    (tmp_path / "crash_once.py").write_text(CRASH_ONCE)
    run = TrainRun(kind="clip", config="micro", steps=4, batch_size=8)
    run_dir = tmp_path / "run"
    metrics = train_flow(run, shards, str(run_dir), "crash_once")

    assert metrics["step"] == 4
    assert [row["step"] for row in metrics["train"]] == [1, 2, 3, 4]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # two attempts: the first failed after its checkpoint at step 2, the retry resumed there and ran steps 3-4 only
    first, second = attempts((run_dir / "launch.log").read_text())
    assert "-m crash_once" in first[0] and first[0].split(" start: ")[1] == second[0].split(" start: ")[1]
    assert "step=2 " in first[1] and "step=3 " not in first[1]
    assert first[2].endswith("end: exited with code 3")
    assert "resumed from" in second[1] and "at step 2" in second[1]
    assert "step=3 " in second[1] and "step=4 " in second[1] and "step=1 " not in second[1]
    assert second[2].endswith("end: exited with code 0")


# A worker that talks for a while, then fails on rank 1 only.
FAIL_ON_RANK_1 = """\
import os
import sys

rank = int(os.environ["RANK"])
unbuffered = os.environ.get("PYTHONUNBUFFERED")
print(f"rank {rank} PYTHONUNBUFFERED={unbuffered} stderr line-buffered={sys.stderr.line_buffering}", flush=True)
for i in range(60):
    print(f"rank {rank} line {i}", flush=True)
if rank == 1:
    raise RuntimeError(f"disk full on rank {rank}")
"""


def test_failed_launch_raises_with_the_log_tail(tmp_path, launch_env, monkeypatch):
    # unbuffered workers write a traceback in pieces that the other rank's lines split (seen once in CI)
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    (tmp_path / "fail_on_rank_1.py").write_text(FAIL_ON_RANK_1)
    run = TrainRun(kind="clip", config="micro", steps=2, nproc_per_node=2)
    with pytest.raises(LaunchError) as err:
        launch_training.fn(run, str(tmp_path / "data"), str(tmp_path / "run"), module="fail_on_rank_1")
    first, tail = str(err.value).split("\n", 1)
    # the first line names the worker's own error, the rest is the end of the captured log
    log = (tmp_path / "run" / "launch.log").read_text()
    assert first == (
        "torchrun exited with code 1 (RuntimeError: disk full on rank 1); "
        f"last 40 lines of {tmp_path / 'run' / 'launch.log'}:"
    )
    assert len(tail.splitlines()) == 40
    assert tail in log
    assert "ChildFailedError" in tail  # torchrun's report of the failed rank ends the log
    assert "rank 0 line 0" in log and "rank 1 line 59" in log  # everything was captured
    # the launcher kept whole-line writes: no PYTHONUNBUFFERED, and torchrun did not start the workers as python -u
    assert "rank 1 PYTHONUNBUFFERED=None stderr line-buffered=True" in log
    assert "rank 0 PYTHONUNBUFFERED=None stderr line-buffered=True" in log
    assert "rank 0 line 0\n" not in tail
    assert log.rstrip().endswith("end: exited with code 1")


def test_run_paths_follow_the_recipe_layout(tmp_path):
    recipe = parse_recipe({**MULTI_NODE, "output": str(tmp_path)})
    assert run_paths(recipe, recipe.train[1]) == (str(tmp_path / "scraped"), str(tmp_path / "clip"))
    # run directories never go to object storage: the recipe's models: folder, else ./runs/<name>, as for `run`
    assert run_paths(recipe, recipe.train[0], "s3://b/x") == ("s3://b/x/scraped", os.path.join("runs", "big", "vae"))
    curated = parse_recipe({**MULTI_NODE, "curate": {"clip": {"model": "micro"}}, "models": str(tmp_path / "models")})
    assert run_paths(curated, curated.train[0], "s3://b/x") == ("s3://b/x/curated", str(tmp_path / "models" / "vae"))
    two = parse_recipe({**MULTI_NODE, "train": [*MULTI_NODE["train"], {"kind": "vae", "config": "tiny", "steps": 9}]})
    assert run_paths(two, two.train[2])[1] == os.path.join("/data/big", "vae-2")


def test_printed_ldm_command_carries_what_altforge_run_adds():
    from pipeline.recipe import load_recipe

    recipe = load_recipe(os.path.join(ROOT, "manifests", "web-scale.example.yaml"))
    words = command_words(print_launch(recipe, "torchrun", kind="ldm"))
    args = words[words.index("-m") + 2 :]
    models = recipe.models or os.path.join("runs", recipe.name)
    assert args[:3] == [f"{recipe.output}/latents", "--out", os.path.join(models, "ldm")]
    flag = {a: b for a, b in zip(args, args[1:], strict=False) if a.startswith("--")}
    assert flag["--text-encoder"] == recipe.encode.text_encoder.model and flag["--vae"] == recipe.encode.vae
    assert flag["--text-pretrained"] == recipe.encode.text_encoder.pretrained
    # a recipe whose encoder is its own CLIP run: the printed command names that run's directory
    demo = load_recipe(os.path.join(ROOT, "manifests", "demo.yaml"))
    words = command_words(print_launch(demo, "torchrun", kind="ldm", out="/w/out"))
    flag = {a: b for a, b in zip(words, words[1:], strict=False) if a.startswith("--")}
    assert flag["--text-encoder"] == "/w/out/clip" and flag["--vae"] == "/w/out/vae"
    assert "--train-text-encoder" in words  # the run's options, as before
    vae_words = command_words(print_launch(demo, "torchrun", kind="vae", out="/w/out"))
    assert vae_words[vae_words.index("--loss") + 1] == "mse"  # a text option reaches the trainer as its value
    # object storage: the storage options travel with the command
    so = {"endpoint_url": "http://127.0.0.1:9"}
    remote = parse_recipe({**MULTI_NODE, "storage_options": so, "models": "/shared/runs"})
    words = command_words(print_launch(remote, "torchrun", kind="vae", out="s3://b/x"))
    assert json.loads(words[words.index("--storage-options") + 1]) == so
    assert words[words.index("--out") + 1] == "/shared/runs/vae"


def test_run_options_become_trainer_flags_after_the_stage_flags():
    opts = {"latent_noise": 0.3, "compile": False, "progress": True, "betas": [0.9, 0.99], "split": "sample"}
    assert option_flags(opts) == [
        "--latent-noise",
        "0.3",
        "--no-compile",
        "--progress",
        "--betas",
        "0.9",
        "0.99",
        "--split",
        "sample",
    ]
    run = TrainRun(kind="ldm", config="tiny", steps=5, options={"workers": 3, "min_snr_gamma": 5})
    args = trainer_args(run, "LAT", "RUN", ["--workers", "1"])
    assert args[-6:] == ["--workers", "1", "--workers", "3", "--min-snr-gamma", "5"]  # argparse: the last one wins


def test_unknown_or_misplaced_options_fail_in_one_line(tmp_path):
    ldm = {"kind": "ldm", "config": "tiny", "steps": 5, "data": "/data/big/lat", "options": {"min_snr_gama": 5}}
    bad = {**MULTI_NODE, "train": [ldm]}
    with pytest.raises(RuntimeError, match=r"train\[0\].options: the ldm trainer has no setting 'min_snr_gama'"):
        check_options(parse_recipe(bad))
    check_options(parse_recipe({**bad, "train": [{**bad["train"][0], "options": {"min_snr_gamma": 5}}]}))
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: {path}: train[0].options: the ldm trainer has no setting 'min_snr_gama'"
    misplaced = {**bad, "train": [{**bad["train"][0], "options": {"steps": 9}}]}
    with pytest.raises(ValueError, match="options.steps: set steps on the run itself"):
        parse_recipe(misplaced)
    clip = {"kind": "clip", "config": "micro", "steps": 5, "options": {"model": "micro-rn"}}  # the CLIP trainer's
    with pytest.raises(ValueError, match="options.model: set config on the run itself"):  # name for config
        parse_recipe({**bad, "train": [clip]})


def test_negative_floats_in_exponent_notation_reach_the_trainer_as_numbers():
    opts = {"offset_noise": -1e-05, "betas": [-2.5e-12, 1e20], "latent_noise": 3e-07}
    assert option_flags(opts) == [
        "--offset-noise", "-0.00001", "--betas", "-0.0000000000025", "100000000000000000000.0",
        "--latent-noise", "0.0000003",
    ]  # fmt: skip
    ldm = {"kind": "ldm", "config": "tiny", "steps": 5, "data": "/data/lat", "options": {"min_snr_gamma": -1e-05}}
    with pytest.raises(RuntimeError) as e:  # parsed as the number it is, then refused by the trainer's own check
        check_options(parse_recipe({**MULTI_NODE, "train": [ldm]}))
    assert "min_snr_gamma = -1e-05" in str(e.value) and "expected one argument" not in str(e.value)
    from training.train_ldm import parse_args

    cfg = parse_args(["DATA", "--out", "OUT", *option_flags({"offset_noise": 2.5e-06, "ema_decay": 0.99999})])
    assert (cfg.offset_noise, cfg.ema_decay) == (2.5e-06, 0.99999)  # exact, not rounded


def test_launch_passes_the_options_to_the_trainer(tmp_path, shards, launch_env):
    run = TrainRun(kind="vae", config="tiny", steps=2, batch_size=8, options={"latent_noise": 0.25, "resolution": 32})
    metrics = train_flow(run, shards, str(tmp_path / "vae"))
    assert metrics["step"] == 2
    config = json.loads((tmp_path / "vae" / "train_config.json").read_text())
    assert config["latent_noise"] == 0.25 and config["resolution"] == 32


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_refused_launch_names_the_refusal_and_is_not_retried(tmp_path, shards, launch_env, nproc):
    run = TrainRun(kind="clip", config="micro", steps=4, batch_size=8, nproc_per_node=nproc,
                   options={"resume": str(tmp_path / "nope")})  # fmt: skip
    run_dir = tmp_path / "run"
    with pytest.raises(LaunchError) as e:
        train_flow(run, shards, str(run_dir))
    first_line = str(e.value).splitlines()[0]
    assert "not a checkpoint directory (no state.json)" in first_line and e.value.refused
    # torchrun exits 1 when its workers refuse (exit 2): its report's root cause says they refused
    assert f"{'python' if nproc == 1 else 'torchrun'} exited with code {2 if nproc == 1 else 1}" in first_line
    assert len(attempts((run_dir / "launch.log").read_text())) == 1  # the same settings would be refused again


def test_a_refusal_on_rank_0_only_is_the_cause_and_the_other_rank_leaves_quietly(tmp_path, shards, launch_env):
    # the held-out set is rank 0's alone: before, rank 1 died in the next collective and its gloo traceback was
    # named as the cause, with the refusal itself out of the quoted tail
    run = TrainRun(kind="clip", config="micro", steps=4, batch_size=8, nproc_per_node=2,
                   options={"eval_data": str(tmp_path / "nope")})  # fmt: skip
    with pytest.raises(LaunchError) as e:
        launch_training.fn(run, shards, str(tmp_path / "run"))
    first_line = str(e.value).splitlines()[0]
    assert first_line.startswith(f"torchrun exited with code 1 (error: no evaluation samples in {tmp_path / 'nope'}")
    assert e.value.refused
    log = (tmp_path / "run" / "launch.log").read_text()
    assert log.count("Traceback") == 1  # torchrun's own report; no rank's
    assert "Connection closed by peer" not in log


def test_option_values_the_trainer_refuses_fail_at_the_check():
    base = {**MULTI_NODE, "train": [{"kind": "clip", "config": "micro", "steps": 5}]}
    for options, named in (
        ({"warmup_steps": "ten"}, "argument --warmup-steps: invalid int value: 'ten'"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ):
        recipe = parse_recipe({**base, "train": [{**base["train"][0], "options": options}]})
        with pytest.raises(RuntimeError, match="train\\[0\\].options: the clip trainer refuses them") as e:
            check_options(recipe)
        assert named in str(e.value) and "\n" not in str(e.value)
    for kind in ("ldm", "vae", "clip"):  # refused when the recipe is checked, not when its stage launches
        for options, named in (({"precision": "fp8"}, "unknown precision 'fp8'"), ({"split": "rows"}, "split")):
            run = {"kind": kind, "config": "micro" if kind == "clip" else "tiny", "steps": 5, "data": "/d/x"}
            recipe = parse_recipe({**base, "train": [{**run, "options": options}]})
            with pytest.raises(RuntimeError, match=f"the {kind} trainer refuses them: .*{named}"):
                check_options(recipe)
