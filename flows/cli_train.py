"""``altforge train clip|vae|ldm`` and ``altforge generate``: the trainers and the sampler from the command line.

Every trainer flag (``--batch-size``, ``--lr``, ``--eval-data``, ...) passes through to the trainer's own parser;
``--nproc-per-node``/``--nnodes`` launch it under torchrun.
"""

import importlib
import os
import re
import signal
import subprocess
import sys
from typing import Annotated

import typer

from flows import env  # telemetry off before anything imports prefect
from flows.cli_common import fail

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
CONFIG_HELP = {
    "clip": "tiny | tiny-vit | micro | a JSON config | an open_clip name",
    "vae": "tiny | sd | a JSON config (diffusers AutoencoderKL)",
    "ldm": "tiny | small | sd15 | a JSON config (diffusers UNet2DConditionModel)",
}


def run_trainer(module: str, argv: list[str], nproc_per_node: int, nnodes: int, rdzv_endpoint: str | None) -> int:
    """Run ``module``'s main(argv) here, or under torchrun for several processes; returns the exit code."""
    from flows.cli_data import torchrun_prefix

    if nproc_per_node * nnodes > 1:
        launch = torchrun_prefix(nproc_per_node, nnodes, rdzv_endpoint)
        return run_torchrun([*launch, *env.torchrun_worker(module), *argv])
    trainer = importlib.import_module(module)
    try:
        return trainer.main(argv)
    except SystemExit as e:  # argparse's own one-line usage errors
        return e.code if isinstance(e.code, int) else 2
    except (FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Exception as e:  # storage that is down or refuses the credentials: one line, not botocore's traceback
        from pipeline.storage import access_error_line, is_access_error

        if not is_access_error(e):
            raise
        fail(access_error_line(e))


# torchrun's own log lines ("W1128 01:00:12.940000 18030 [site-packages path/]torch/distributed/elastic/...")
ELASTIC_LOG = re.compile(r"^[WEI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")


def run_torchrun(cmd: list[str]) -> int:
    """Run torchrun; returns the failed rank's exit code (2 for the trainers' one-line errors), else torchrun's.

    On a terminal everything passes through as is (progress bars included). Otherwise (logs, CI, a launcher) the
    ranks' output passes through as it comes, and torchrun's own report of a failed rank (its log lines, traceback
    and ChildFailedError table, after the ranks printed their errors) shrinks to one line that names the rank and
    its exit code, or the signal that killed it.
    """
    if sys.stderr.isatty():
        return subprocess.call(cmd)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    logs: list[str] = []  # torchrun's log lines: shown at the end unless its failure report follows
    traceback: list[str] = []  # a traceback being read: a rank's (shown) or torchrun's (the report)
    report: list[str] | None = None

    def take(line: str) -> None:
        nonlocal traceback, report
        if report is not None:
            report.append(line)
        elif traceback:
            traceback.append(line)
            if "torch/distributed/run.py" in line:  # torchrun's traceback, not a rank's
                report, traceback = traceback, []
            elif not line.startswith((" ", "\t")):  # a rank's traceback ended: show it
                sys.stderr.write("".join(traceback))
                traceback = []
        elif line.startswith("Traceback (most recent call last)"):
            traceback = [line]
        elif ELASTIC_LOG.match(line):  # the ranks write to the same pipe: these interleave with their lines
            logs.append(line)
        else:
            sys.stderr.write(line)

    while True:  # after Ctrl-C keep reading: the ranks print their own interrupts, and a full pipe would block them
        try:
            for line in proc.stderr:
                take(line)
            break
        except KeyboardInterrupt:
            continue
    code = proc.wait()
    if report is None:
        sys.stderr.write("".join(logs + traceback))
        return code
    return _summarise_failure("".join(report), code)


def _summarise_failure(report: str, code: int) -> int:
    """One line from torchrun's ChildFailedError table: the root-cause rank and its exit code or signal."""
    ranks = [(int(r), int(c)) for r, c in re.findall(r"rank\s+:\s*(\d+)[^\n]*\n\s*exitcode\s+:\s*(-?\d+)", report)]
    root = report.split("Root Cause", 1)[-1]
    cause = re.search(r"rank\s+:\s*(\d+)[^\n]*\n\s*exitcode\s+:\s*(-?\d+)", root)
    rank, exit_code = (int(cause.group(1)), int(cause.group(2))) if cause else (None, code)
    failed = [r for r, c in ranks if c != -signal.SIGTERM] or [r for r, _ in ranks]  # not the ones torchrun stopped
    who = f"rank {rank}" if rank is not None else f"{len(failed)} rank(s)"
    if exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
        hint = " (out of memory?)" if -exit_code == signal.SIGKILL else ""
        sys.stderr.write(f"error: {who} was killed by {name}{hint}\n")
        return 128 - exit_code
    sys.stderr.write(f"error: {who} failed (exit code {exit_code}); its own error is above\n")
    return exit_code if exit_code > 0 else 1


def trainer_command(kind: str, summary: str, default_config: str):
    """The ``altforge train KIND`` command for ``training.train_KIND``."""
    module = f"training.train_{kind}"

    def command(
        ctx: typer.Context,
        data: Annotated[str, typer.Argument(help="dataset dir, manifest.json or brace pattern")] = "",
        out: Annotated[str, typer.Option("--out", help="run directory (checkpoints, logs, the model)")] = "",
        config: Annotated[str, typer.Option(help=CONFIG_HELP[kind])] = default_config,
        steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
        nproc_per_node: Annotated[int, typer.Option(help="processes (GPUs) on this node: >1 launches torchrun")] = 1,
        nnodes: Annotated[int, typer.Option(help="nodes, for multi-node torchrun")] = 1,
        rdzv_endpoint: Annotated[str | None, typer.Option(help="host:port of the rendezvous, multi-node")] = None,
        help_: Annotated[bool, typer.Option("--help", help="show every training option")] = False,
    ) -> None:
        if help_:
            from flows.cli_data import module_help

            raise typer.Exit(module_help(module))
        if not data or not out:
            fail(f"usage: altforge train {kind} DATA --out DIR [--config NAME] [--steps N] [training flags]")
        if "://" not in data and "{" not in data and not os.path.exists(data):
            fail(f"dataset not found: {data}")
        if steps is not None and steps < 1:
            fail(f"--steps must be at least 1, got {steps}")
        argv = [data, "--out", out, "--config", config, *([] if steps is None else ["--steps", str(steps)]), *ctx.args]
        raise typer.Exit(run_trainer(module, argv, nproc_per_node, nnodes, rdzv_endpoint))

    command.__doc__ = summary + "; other flags go to the trainer (see --help)."
    return command


train_clip = trainer_command("clip", "Train a contrastive image-text (CLIP) model", "tiny")
train_vae = trainer_command("vae", "Train an image autoencoder (diffusers AutoencoderKL) on image shards", "tiny")
train_ldm = trainer_command("ldm", "Train a text-conditioned latent diffusion U-Net on latent shards", "tiny")


def generate(
    ctx: typer.Context,
    help_: Annotated[bool, typer.Option("--help", help="show every sampling option")] = False,
) -> None:
    """Generate images: MODEL_DIR "prompt" [--negative T] [--steps 50] [--guidance 7.5] [--seed 0] [-n 4] --out F."""
    from training.sample import main as sample_main

    if help_ or not ctx.args:
        raise typer.Exit(subprocess.call([sys.executable, "-m", "training.sample", "--help"]))
    try:
        code = sample_main(list(ctx.args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    raise typer.Exit(code)
