"""Training launches: a recipe's training run as a torchrun command, an sbatch script, or a Prefect task.

The task runs the trainer in a subprocess (torchrun when the run has more than one process), appends its output to
``<run dir>/launch.log``, streams it to the run logger, and fails with the tail of the log. A retried task resumes:
every trainer continues from the latest checkpoint in its ``--out`` directory.
"""

from __future__ import annotations

import collections
import decimal
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from flows import env as env_module
from pipeline import storage
from pipeline.recipe import Recipe, TrainRun

TRAINERS = {"clip": "training.train_clip", "vae": "training.train_vae", "ldm": "training.train_ldm"}
DEFAULT_RDZV_PORT = 29500  # torchrun's usual rendezvous port, for Slurm jobs whose recipe names none
LOG_NAME = "launch.log"  # in the run directory; every attempt is appended
LOG_MARK = "[altforge launch]"  # starts the lines the launcher adds to the log (each attempt's start and end)
TAIL_LINES = 40  # log lines quoted in the error of a failed launch
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")  # this interpreter's torchrun, for local launches
# the last line of a Python traceback, as a worker prints it (torchrun prefixes "[rankN]: ")
_ERROR_LINE = re.compile(
    r"^(?:\[rank(\d+)\]:\s*)?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)(?::.*)?)$"
)
_REFUSAL_LINE = re.compile(r"^(?:\[rank(\d+)\]:\s*)?(?:[\w.]+: )?(error: .+)$")  # a trainer's or argparse's refusal
_ROOT_CAUSE = re.compile(r"^Root Cause \(first observed failure\)")  # torchrun's report of its failed workers
_WORKER_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class LaunchError(RuntimeError):
    """A training launch that exited non-zero; the message ends with the tail of its log."""

    def __init__(self, message: str, code: int | None = None, refused: bool | None = None):
        super().__init__(message)
        self.code = code  # the launched command's exit status
        # the trainer refused its settings (exit status 2): under torchrun, whose own status is then 1, the
        # status its report gives the first worker that failed
        self.refused = code == 2 if refused is None else refused


def _worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition for a launch: a trainer that refused its settings (exit status 2) would refuse
    them again, so only other failures (a killed or crashed run, which resumes from its checkpoint) retry."""
    exc = getattr(state, "data", None)
    return not (isinstance(exc, LaunchError) and exc.refused)


def run_paths(recipe: Recipe, run: TrainRun, out: str | None = None) -> tuple[str, str]:
    """The dataset a training run reads and its run directory, where ``altforge run`` puts them.

    Datasets live under ``out`` (default: the recipe's output), run directories under the recipe's ``models:``
    (default: the output when it is local, else ``./runs/<recipe name>``).
    """
    from flows.run import DATA_KINDS, models_dir
    from flows.stages import run_name

    base = storage.local_path(out or recipe.output)
    data = recipe.data_of(run)
    data_url = storage.join(base, data) if data in DATA_KINDS else data  # else the URL the recipe named
    return data_url, os.path.join(models_dir(recipe, base), run_name(recipe, run))


def stage_flags(recipe: Recipe, run: TrainRun, out: str | None = None) -> list[str]:
    """The flags ``altforge run`` adds to this run's trainer: checkpoints, evaluation data, the text encoder and
    VAE that ``train:<kind>`` names (the run directories of the runs trained before it), storage options."""
    from types import SimpleNamespace

    from flows.run import has_demo_site, models_dir
    from flows.stages import StageContext, run_name, trainer_flags

    base = storage.local_path(out or recipe.output)
    models = models_dir(recipe, base)
    order = sorted(recipe.train, key=recipe.phase_of)  # stable: file order within a phase
    runs = {t.kind: os.path.join(models, run_name(recipe, t)) for t in order[: order.index(run)]}  # last one wins
    heldout = storage.join(base, "heldout") if has_demo_site(recipe) and storage.is_local(base) else None
    so = recipe.storage_options or None
    ctx = StageContext(recipe, base, so, None, None, SimpleNamespace(models=models), "", runs=runs, heldout=heldout)
    return trainer_flags(ctx, run, run_paths(recipe, run, out)[0])


def find_run(recipe: Recipe, kind: str | None = None) -> TrainRun:
    """The recipe's training run of ``kind`` (or its only/first run); ValueError with one line if there is none."""
    runs = [t for t in recipe.train if kind is None or t.kind == kind]
    if not runs:
        what = f"no '{kind}' training run" if kind else "no training runs"
        raise ValueError(
            f"recipe '{recipe.name}' has {what} (its train section lists: "
            f"{', '.join(t.kind for t in recipe.train) or 'nothing'})"
        )
    return runs[0]


CONFIG_CLASSES = {"clip": "ClipTrainConfig", "vae": "VaeTrainConfig", "ldm": "LdmTrainConfig"}


def option_flags(options: dict) -> list[str]:
    """A run's ``options`` as trainer flags: ``--name value``, ``--name a b`` for lists, ``--[no-]name`` for bools."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, *(flag_value(v) for v in value)]
        else:
            flags += [flag, flag_value(value)]
    return flags


def flag_value(value) -> str:
    """A setting as a command-line value. A float is written exactly and without an exponent: argparse reads
    ``-1e-05`` as an option name, but ``-0.00001`` as a negative number."""
    if isinstance(value, float) and math.isfinite(value):
        text = format(decimal.Decimal(repr(value)), "f")
        return text if "." in text else text + ".0"
    return str(value)


def check_options(recipe: Recipe) -> None:
    """RuntimeError (one line) when a training run's ``options`` names a setting its trainer does not have, or
    gives one a value the trainer refuses (its own command line parses them, as the launch will)."""
    import contextlib
    import dataclasses
    import importlib
    import io

    for i, run in enumerate(recipe.train):
        if not run.options:
            continue
        module = importlib.import_module(TRAINERS[run.kind])
        known = {f.name for f in dataclasses.fields(getattr(module, CONFIG_CLASSES[run.kind]))}
        for key in run.options:
            if key not in known:
                raise RuntimeError(f"train[{i}].options: the {run.kind} trainer has no setting {key!r}")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                module.parse_args(["DATA", "--out", "OUT", *option_flags(run.options)])
        except SystemExit as e:
            if e.code:
                lines = [ln for ln in err.getvalue().splitlines() if "error: " in ln] or [f"exit status {e.code}"]
                why = lines[-1].split("error: ", 1)[-1]
                raise RuntimeError(f"train[{i}].options: the {run.kind} trainer refuses them: {why}") from None


def trainer_args(run: TrainRun, data: str, run_dir: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The trainer's own arguments (``DATA --out DIR --config NAME --steps N ...``) for a recipe's run.

    The run's ``options`` come last, so they win over the stage's own flags (``--workers``, ...).
    """
    args = [data, "--out", run_dir, "--config", run.config, "--steps", str(run.steps)]
    if run.batch_size is not None:  # else the trainer's own default, as for `altforge train`
        args += ["--batch-size", str(run.batch_size)]
    if run.lr is not None:
        args += ["--lr", repr(run.lr)]
    if run.max_minutes > 0:
        args += ["--max-minutes", repr(run.max_minutes)]
    return [*args, *extra, *option_flags(run.options)]


def rendezvous_flags(run: TrainRun, rdzv_id: str | None = None) -> list[str]:
    """torchrun's node and rendezvous flags: c10d at the recipe's endpoint, or on loopback for one node."""
    if run.nnodes > 1 and not run.rdzv_endpoint:
        raise ValueError(f"train.{run.kind}: nnodes {run.nnodes} needs rdzv_endpoint (host:port of the first node)")
    flags = [f"--nnodes={run.nnodes}", f"--nproc-per-node={run.nproc_per_node}", "--rdzv-backend=c10d"]
    if run.rdzv_endpoint:
        flags.append(f"--rdzv-endpoint={run.rdzv_endpoint}")
    else:  # one node: a free loopback port, and workers told to meet on 127.0.0.1 rather than the host's name
        flags += ["--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    if rdzv_id:
        flags.append(f"--rdzv-id={rdzv_id}")
    return flags


def torchrun_argv(
    run: TrainRun,
    data: str,
    run_dir: str,
    extra: list[str] | tuple[str, ...] = (),
    module: str | None = None,  # default: the trainer of run.kind
    launcher: tuple[str, ...] = ("torchrun",),
    rdzv_id: str | None = None,
    bare: bool = False,  # start each worker as this ``python -m module`` itself (torchrun's --no-python)
) -> list[str]:
    """The torchrun command line of a training run: launcher, node/rendezvous flags, ``-m module`` and its args;
    ``bare``: this interpreter is the program, without torchrun's ``-u`` (:func:`flows.env.torchrun_worker`)."""
    module = module or TRAINERS[run.kind]
    program = env_module.torchrun_worker(module) if bare else ["-m", module]
    return [*launcher, *rendezvous_flags(run, rdzv_id), *program, *trainer_args(run, data, run_dir, extra)]


def launch_argv(
    run: TrainRun, data: str, run_dir: str, extra: list[str] | tuple[str, ...] = (), module: str | None = None
) -> list[str]:
    """What a local launch runs: this interpreter's torchrun for more than one process, else ``python -m``."""
    if run.nproc_per_node * run.nnodes > 1:  # workers without -u: run_logged reads their lines from one pipe
        return torchrun_argv(run, data, run_dir, extra, module, launcher=TORCHRUN, bare=True)
    return [sys.executable, "-m", module or TRAINERS[run.kind], *trainer_args(run, data, run_dir, extra)]


def shell_command(argv: list[str]) -> str:
    """A command as shell text, one flag per continued line (the trainer's arguments stay on the last line)."""
    words = [shlex.quote(a) for a in argv]
    cut = argv.index("-m", 1) if "-m" in argv[1:] else len(argv)
    lines = [words[0], *words[1:cut]]
    if cut < len(words):
        lines.append(" ".join(words[cut:]))
    return " \\\n    ".join(lines)


def torchrun_command(recipe: Recipe, run: TrainRun, out: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """The torchrun command of a recipe's training run, to paste on each node of a user's cluster."""
    data, run_dir = run_paths(recipe, run, out)
    extra = (*stage_flags(recipe, run, out), *extra)
    argv = torchrun_argv(run, data, run_dir, extra, rdzv_id=f"{recipe.name}-{run.kind}")
    where = f"on each of the {run.nnodes} nodes" if run.nnodes > 1 else "on the training machine"
    return f"# {recipe.name}: {run.kind} training, {run.nnodes} x {run.nproc_per_node} processes; run {where}\n" + (
        shell_command(argv) + "\n"
    )


def sbatch_script(
    recipe: Recipe,
    run: TrainRun,
    out: str | None = None,
    extra: tuple[str, ...] = (),
    gpus_per_node: int | None = None,  # default: one GPU per process
) -> str:
    """An sbatch script: one srun task per node, each running torchrun with its Slurm node rank.

    The rendezvous host is the allocation's first node (the recipe's endpoint names a host of the user's cluster,
    which Slurm decides here); its port is the recipe's, else 29500.
    """
    data, run_dir = run_paths(recipe, run, out)
    extra = (*stage_flags(recipe, run, out), *extra)
    port = run.rdzv_endpoint.rsplit(":", 1)[-1] if run.rdzv_endpoint and ":" in run.rdzv_endpoint else None
    port = port or str(DEFAULT_RDZV_PORT)
    job = f"altforge-{recipe.name}-{run.kind}"
    module = TRAINERS[run.kind]
    flags = [
        f"--nnodes={run.nnodes}",
        f"--nproc-per-node={run.nproc_per_node}",
        '--node-rank="$SLURM_NODEID"',
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"',
        '--rdzv-id="$SLURM_JOB_ID"',
    ]
    trainer = " ".join(shlex.quote(a) for a in ["-m", module, *trainer_args(run, data, run_dir, extra)])
    # srun starts one task per node; bash -c makes each expand its own $SLURM_NODEID
    inner = " \\\n    ".join(["exec torchrun", *flags, trainer])
    gpus = run.nproc_per_node if gpus_per_node is None else gpus_per_node
    lines = [
        "#!/bin/bash",
        f"# {recipe.name}: {run.kind} training, {run.nnodes} nodes x {run.nproc_per_node} processes; sbatch this file",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={run.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
        f"#SBATCH --output={job}-%j.log",
        "set -euo pipefail",
        "",
        "# the rendezvous lives on the first node of the allocation (sed reads all lines: no SIGPIPE under pipefail)",
        'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        f"export RDZV_HOST RDZV_PORT={port}",
        "",
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
        "",
    ]
    return "\n".join(lines)


def print_launch(recipe: Recipe, fmt: str, kind: str | None = None, out: str | None = None) -> str:
    """What ``altforge launch RECIPE --print torchrun|slurm`` prints for the recipe's run of ``kind``."""
    run = find_run(recipe, kind)
    if fmt == "torchrun":
        return torchrun_command(recipe, run, out)
    if fmt == "slurm":
        return sbatch_script(recipe, run, out)
    raise ValueError(f"--print must be torchrun or slurm, not {fmt!r}")


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_logged(
    argv: list[str],
    log_path: str,
    logger=None,  # anything with .info(str); each output line goes to it
    env: dict | None = None,
    tail_lines: int = TAIL_LINES,
) -> None:
    """Run ``argv`` with stdout+stderr appended to ``log_path`` and streamed to ``logger``; LaunchError on failure.

    All ranks share one pipe, so each must write whole lines: PYTHONUNBUFFERED is dropped from the children's
    environment, since it makes Python write a traceback (and every print) in pieces that another rank's lines
    can split, and :func:`launch_argv` has torchrun start its workers without ``-u`` for the same reason. Their
    stderr is then line-buffered, and the trainers make their stdout line-buffered too.
    """
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONUNBUFFERED"}
    if "--local-addr=127.0.0.1" in argv:  # one node (rendezvous_flags): its ranks talk over loopback only
        env = env_module.loopback_gloo(env)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    cause = refusal = None  # the last exception line a worker printed; the first refusal (``error: ...``) line
    in_root, root_code = False, None  # torchrun's report: the exit status of the first worker that failed
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"{LOG_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, env=env
        )
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                tail.append(line)
                if refusal is None and (found := _REFUSAL_LINE.match(line)):
                    refusal = (f"rank {found[1]}: " if found[1] else "") + found[2]
                found = _ERROR_LINE.match(line)
                if found and "ChildFailedError" not in line:  # torchrun's own report names no cause
                    cause = (f"rank {found[1]}: " if found[1] else "") + found[2]
                if _ROOT_CAUSE.match(line):
                    in_root = True
                elif in_root and root_code is None and (worker := _WORKER_EXIT.match(line)):
                    root_code = int(worker[1])
                if logger is not None:
                    logger.info(line)
            code = proc.wait()
        except BaseException:  # the task was cancelled or timed out: torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            proc.stdout.close()
        log.write(f"{LOG_MARK} {time.strftime('%Y-%m-%d %H:%M:%S')} end: {_exit_reason(code)}\n")
    if code != 0:
        torchrun = any(a == "-m" and b == "torch.distributed.run" for a, b in zip(argv, argv[1:], strict=False))
        name = "torchrun" if torchrun else os.path.basename(argv[0])
        body = "\n".join(tail)
        cause = refusal or cause  # after a refusal, the other ranks' errors are its consequences
        why = f" ({cause})" if cause else ""
        message = f"{name} {_exit_reason(code)}{why}; last {len(tail)} lines of {log_path}:\n{body}"
        raise LaunchError(message, code, refused=code == 2 or root_code == 2)


def read_metrics(run_dir: str) -> dict:
    """The trainer's ``metrics.json`` in a local run directory, or {} when it wrote none."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@task(
    name="train",
    task_run_name="train-{run.kind}",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_worth_retrying,
    cache_policy=NO_CACHE,
)
def launch_training(
    run: TrainRun,
    data: str,
    run_dir: str,  # local directory: checkpoints, launch.log, metrics.json
    extra_args: list[str] | None = None,  # more trainer flags (--workers 1, --eval-data DIR, ...)
    module: str | None = None,  # default: the trainer of run.kind
) -> dict:
    """Run a training run (torchrun for several processes) with its log captured; returns its metrics.json.

    A retry of this task resumes from the run directory's latest checkpoint.
    """
    argv = launch_argv(run, data, run_dir, tuple(extra_args or ()), module)
    try:
        logger = get_run_logger()
    except MissingContextError:  # called as .fn outside a run
        logger = logging.getLogger(__name__)
    run_logged(argv, os.path.join(run_dir, LOG_NAME), logger)
    return read_metrics(run_dir)
