"""What the three trainers share around their loops: the entry point, stopping, the schedule, precision, JSON.

Each trainer's loop stays in its own ``train_*.py`` and reads top to bottom; these are the few lines they would
otherwise each repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.storage import access_error_line, is_access_error
from training import distributed
from training.data import SPLITS, error_line

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) are one ``error:`` line and exit status
    2, like every other refusal, instead of the usage block; ``--help`` still prints it whole."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def trainer_main(train_fn, parse_fn, argv: list[str] | None) -> int:
    """A trainer's entry point, also each torchrun rank's: parse, train; a setting or input refused as training
    starts is one ``error:`` line and exit status 2 (a rank that trained no step exits 1)."""
    if hasattr(sys.stdout, "reconfigure"):  # whole lines, as they happen, into the launcher's shared pipe
        sys.stdout.reconfigure(line_buffering=True)
    cfg = parse_fn(argv)
    try:
        result = train_fn(cfg)
    except (ValueError, FileNotFoundError) as e:
        if not _raised_by_project(e):  # torch, numpy or PIL: a bug to see whole, not a refusal
            raise
        sys.stderr.write(f"error: {error_line(e)}\n")  # one write: the ranks of a torchrun share the pipe
        return 2
    except Exception as e:  # storage that is down or refuses the credentials (botocore's errors are not OSError)
        if not is_access_error(e):
            raise
        sys.stderr.write(f"error: {access_error_line(e)}\n")
        return 2
    return 0 if result["step"] > 0 else 1


def config_from_flags(make, flags: dict):
    """``make(**flags)`` (a trainer config); a value it refuses is one ``error:`` line and exit status 2, without
    argparse's usage block (argparse's own errors, an unknown flag, keep theirs)."""
    try:
        return make(**flags)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


def _raised_by_project(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is altforge's own code (a deliberate refusal), also for an
    error a DataLoader worker raised (its traceback is in the message)."""
    root = str(Path(__file__).resolve().parents[1])
    files = re.findall(r'File "([^"]+)"', str(e)) if str(e).startswith("Caught ") else []
    if not files:
        tb = traceback.extract_tb(e.__traceback__)
        files = [tb[-1].filename] if tb else []
    last = str(Path(files[-1]).resolve()) if files else ""
    return last.startswith(root + os.sep) and f"{os.sep}site-packages{os.sep}" not in last


def check_choices(cfg) -> None:
    """One-line ``ValueError`` for a trainer config whose ``precision`` or ``split`` is not one of the known
    values: refused when the config is made (``altforge validate`` for a recipe's options), not at train time."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}: use {', '.join(PRECISIONS)}")
    if cfg.split not in SPLITS:
        raise ValueError(f"unknown split {cfg.split!r}: use {', '.join(SPLITS)}")


def float_settings_out_of_range(cfg, positive=(), non_negative=(), unit=(), finite=()) -> list[str]:
    """What is wrong with a trainer config's float settings, as ``"name = value (needs ...)"`` entries: each must be
    finite, and > 0 (``positive``), >= 0 (``non_negative``), in [0, 1] (``unit``) or nothing more (``finite``);
    ``betas`` in [0, 1) and ``min_lr`` <= ``lr`` where the config has them. A negative weighting or noise would
    otherwise train as if it were off, and a negative learning rate fail inside torch's optimizer with a traceback."""
    bad = []
    rules = [(n, "> 0", lambda v: v > 0) for n in positive]
    rules += [(n, ">= 0", lambda v: v >= 0) for n in non_negative]
    rules += [(n, "in [0, 1]", lambda v: 0 <= v <= 1) for n in unit]
    rules += [(n, "", lambda v: True) for n in finite]
    for name, need, ok in rules:
        value = getattr(cfg, name)
        if not (math.isfinite(value) and ok(value)):
            bad.append(f"{name} = {value} (needs a finite number{' ' + need if need else ''})")
    betas = getattr(cfg, "betas", (0.0, 0.0))
    if not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        bad.append(f"betas = {tuple(betas)} (need two numbers in [0, 1))")
    lr, min_lr = getattr(cfg, "lr", None), getattr(cfg, "min_lr", None)
    if lr is not None and min_lr is not None and math.isfinite(lr) and 0 < lr < min_lr:
        bad.append(f"min_lr = {min_lr} (needs <= lr = {lr})")
    return bad


def run_dir(out: str) -> Path:
    """The run directory, created if need be; a one-line ``ValueError`` when it cannot be (``--out`` names a file,
    or a folder without write permission)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the run directory: {e.strerror or e}") from None
    return path


def reached_stop(cfg, step: int, train_seconds: float) -> bool:
    """Whether ``--stop-after`` or ``--max-minutes`` ends a run at ``step`` (any trainer config with both fields)."""
    return (cfg.stop_after > 0 and step >= cfg.stop_after) or (
        cfg.max_minutes > 0 and train_seconds >= cfg.max_minutes * 60
    )


def stop_before_start(cfg, step: int, train_seconds: float, is_main: bool) -> bool:
    """:func:`reached_stop` before the first step: a relaunch of a run that already got there leaves at once (the
    same on every rank, from the checkpoint's numbers)."""
    stop = reached_stop(cfg, step, train_seconds)
    if stop and step < cfg.steps and is_main:
        print(f"step {step}: --stop-after {cfg.stop_after} or --max-minutes {cfg.max_minutes} already reached")
    return stop


class DivergenceWatch:
    """Notices a NaN or infinite loss without a per-step device sync, and stops the run before anything is logged,
    evaluated, saved or sampled from diverged weights.

    ``see`` after every loss (a tensor OR, no sync). ``check`` where the loop would write, on every rank at the same
    steps (it is one collective): given a ``probe`` (the loss of the current weights on the last batch, no grad),
    it also catches the update that ruined the weights after the last finite training loss, so the checkpoint or
    export about to be written is refused rather than named as the one to resume from. Off under fp16, whose
    GradScaler already skips the steps with inf/NaN gradients.
    """

    def __init__(self, device: torch.device, enabled: bool = True, start_step: int = 0):
        self.device, self.enabled = device, enabled
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.checked_step = start_step  # the last step whose weights passed a probe (a resumed run: its checkpoint's)

    def see(self, loss: torch.Tensor) -> None:
        """Remember whether ``loss`` is NaN or infinite."""
        if self.enabled:
            self.bad |= ~torch.isfinite(loss.detach()).all()

    def check(self, step: int, lr: float, probe: Callable[[], torch.Tensor | None] | None = None) -> None:
        """One-line ``ValueError`` on every rank if any rank saw a non-finite loss since the last check."""
        if not self.enabled:
            return
        probed = probe is not None and (loss := probe()) is not None
        if probed:
            self.see(loss)
        if distributed.mean_over_ranks(float(self.bad), self.device) > 0:
            raise ValueError(
                f"step {step}: the loss became NaN or infinite after step {self.checked_step}; nothing from the "
                f"diverged weights was saved: lower --lr (now {lr:g}) and resume from the last checkpoint"
            )
        if probed:  # the weights themselves passed, not only the losses of the updates that made them
            self.checked_step = step


def probe_loss(module: torch.nn.Module, device: torch.device, amp_dtype, loss_fn: Callable[[], torch.Tensor]):
    """``loss_fn()`` with ``module`` in eval mode, without grad, under the run's autocast, and the RNG left as it was:
    a divergence probe must not change what training draws next (exact resume)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        module.eval()
        try:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                return loss_fn()
        finally:
            module.train()


def window_row(window: dict, step: int, lr: float, global_batch: int, train_seconds: float, device, **extra) -> dict:
    """The log row for a window of steps: the loss (mean over ranks), then ``extra`` (a trainer's own measures),
    the learning rate, samples/s, the share of time spent waiting for batches, and the training time so far."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - window["t"]
    return {
        "step": step,
        "loss": distributed.mean_over_ranks(float(window["loss"]) / window["steps"], device),
        **extra,
        "lr": lr,
        "samples_per_s": global_batch * window["steps"] / elapsed,
        "data_wait": window["data"] / elapsed,
        "train_seconds": round(train_seconds, 2),
    }


def scheduled_lr(cfg, step: int, train_seconds: float, warmup: int) -> float:
    """A trainer's learning rate: linear warm-up to ``cfg.lr`` over ``warmup`` steps, then a cosine to
    ``cfg.min_lr`` at ``cfg.steps``, read where :func:`schedule_at` puts the run."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (schedule_at(cfg, step, train_seconds) - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def schedule_at(cfg, step: int, train_seconds: float) -> float:
    """Where a trainer's learning-rate schedule is, in steps: ``step``, or, with ``--max-minutes`` and
    ``--budget-schedule``, the share of the time box used times ``steps`` when that is further along.

    A run stopped by its time box then ends its decay at the box instead of part-way down the cosine (budget-aware
    schedules, Li et al. 2020). A run that reaches ``--steps`` first keeps the step schedule. Off by default: on the
    demo's 2.5-minute VAE it cost 1.8 dB of held-out PSNR, and the U-Net gained nothing measurable (BENCHMARKS.md).
    """
    if cfg.max_minutes <= 0 or not cfg.budget_schedule:
        return float(step)
    return max(float(step), cfg.steps * train_seconds / (cfg.max_minutes * 60))


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 on CPU; on GPU bf16 where supported, else fp16, unless given. One-line ``ValueError`` for an unknown
    precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            raise ValueError(f"precision {precision} needs a GPU; CPU training runs in fp32")
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def write_json(path: Path, doc: dict) -> None:
    """Write JSON atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(path)
