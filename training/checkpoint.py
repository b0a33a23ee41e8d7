"""Training checkpoints as safetensors + JSON: model, optimizer, scaler, RNG states and loop state, for exact resume.

A checkpoint is a directory ``<run>/checkpoints/step_NNNNNNNN/`` holding ``model.safetensors``,
``optimizer.safetensors`` (every tensor of the optimizer state), ``rng.safetensors`` (torch RNG states) and
``state.json`` (step, scheduler, scaler, python/numpy RNG, data positions, config). It is written under a
temporary name and renamed, so a run killed mid-write leaves the previous checkpoint intact. Nothing is
unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline import storage

LATEST = "latest"  # text file naming the newest complete checkpoint directory
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")  # besides state.json


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """The python/numpy RNG states (JSON) and the torch CPU/CUDA RNG states (tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return js, tensors


def set_rng_state(js: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    names = [k for k in tensors if k.startswith("torch_cuda_")]
    cuda = [tensors[k] for k in sorted(names, key=lambda k: int(k.rsplit("_", 1)[1]))]  # device 10 after device 9
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split an optimizer state dict into JSON (param groups, scalar entries) and named tensors."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def optimizer_from_flat(js: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`optimizer_to_flat`: an optimizer state dict for ``load_state_dict``."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *js["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": js["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,  # JSON-able loop state: scheduler, scaler, data positions, metrics, config ...
    keep: int = 2,  # most recent checkpoints kept (older ones removed)
) -> Path:
    """Write the checkpoint of ``step`` atomically and point ``latest`` at it; returns its directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model = getattr(model, "module", model)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
    )
    opt_js, opt_tensors = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_js, rng_tensors = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    doc = {"step": step, "optimizer": opt_js, "rng": rng_js, **state}
    (tmp / "state.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    _sync(tmp)  # on disk before the rename makes it the newest: a host crash cannot leave it half written
    replaced = root / f".old-step_{step:08d}"
    if final.exists():  # the same step again (a finished run relaunched): move it aside, never delete it first
        if replaced.exists():
            shutil.rmtree(replaced)
        final.rename(replaced)
    tmp.rename(final)  # a kill between the two renames leaves .old-step_N, which latest_checkpoint falls back to
    (root / f"{LATEST}.tmp").write_text(final.name, encoding="utf-8")
    (root / f"{LATEST}.tmp").replace(root / LATEST)
    if replaced.exists():
        shutil.rmtree(replaced)
    # prune among the checkpoints up to this one: higher steps left by an abandoned run are not "newer"
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run (the one ``latest`` names), or None.

    When ``latest`` names a directory that is gone (a kill in the middle of replacing a checkpoint of the same
    step), the newest complete ``step_*`` or the set-aside ``.old-step_*`` is used instead of starting over. So is
    an older one, with a warning, when the newest is damaged (a file cut short or missing: a disk that filled up,
    a host that crashed before its writes reached the disk): the run resumes from the last checkpoint it can read.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not root.is_dir():
        return None
    # no pointer: a kill between the first checkpoint's rename and the pointer's write, or none saved yet
    named = root / (pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else "none")
    why = damage(named)  # also for a named directory that is gone
    if why is None:
        return named

    def step_of(p: Path) -> str:
        return p.name.rsplit("_", 1)[-1]

    present = (named / "state.json").is_file()
    candidates = [p for p in root.glob("*step_*") if p.is_dir() and not p.name.startswith(".tmp-")]
    if present:  # damaged: an older one, not a higher step an abandoned run left behind
        candidates = [p for p in candidates if step_of(p) < step_of(named)]
    for path in sorted(candidates, key=step_of, reverse=True):
        if damage(path) is None:
            if present:
                sys.stderr.write(f"warning: {named} is damaged ({why}); resuming from {path.name}\n")
            return path
    return named if present else None  # all damaged: loading it names what is wrong


def _sync(directory: Path) -> None:
    """fsync every file of ``directory``, then the directory itself."""
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(path: str | Path) -> str | None:
    """What makes a checkpoint directory unreadable (one line), or None when its state.json parses to an object and
    each safetensors file's header is whole and covers the file. Reads headers only, not the tensors."""
    path = Path(path)
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"state.json: {e}"
    if not isinstance(doc, dict) or not all(k in doc for k in ("step", "optimizer", "rng")):
        return "state.json: not a checkpoint state (no step, optimizer and rng)"
    for name in FILES:
        try:
            with safe_open(str(path / name), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's strides.

    Checkpoints store tensors contiguous; a channels_last parameter then gets contiguous moments back, which the
    fused AdamW refuses ("params, grads, exp_avgs, and exp_avg_sqs must have same dtype, device, and layout").
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def read_state(path: str | Path) -> dict:
    """A checkpoint directory's state.json (step, config, data positions, ...), without loading any tensor.

    One-line ``ValueError`` when ``path`` is no checkpoint directory or its state.json is unreadable."""
    state = Path(path) / "state.json"
    if not state.is_file():
        raise ValueError(f"{path}: not a checkpoint directory (no state.json)")
    try:
        return storage.read_json_object(str(state))
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable checkpoint state: {e}") from None


LOOP_FIELDS = ("step", "metrics", "train_seconds", "scaler")  # what each trainer's loop resumes from state.json
DATA_FIELDS = ("data", "world_size", "workers")  # what its data position resumes from (training.data)


def resume_fields(doc: dict, path: str | Path, *keys: str) -> list:
    """``doc[key]`` for each key of a checkpoint's state; a one-line ``ValueError`` naming the missing ones (the
    data position's fields are checked too, so a damaged state.json fails here, not in the loader)."""
    missing = [k for k in (*keys, *DATA_FIELDS) if k not in doc]
    if missing:
        raise ValueError(
            f"{path}: damaged checkpoint (state.json lacks {', '.join(missing)}); resume from another, or start over"
            " with --resume none"
        )
    return [doc[k] for k in keys]


def load_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore a gradient scaler. A checkpoint saved without fp16 (CPU, fp32 or bf16) holds an empty state: a
    resume in fp16 then starts its loss scale afresh, where ``load_state_dict`` would refuse the empty state."""
    if state:
        scaler.load_state_dict(state)


def check_fits(path: str | Path, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """One-line ``ValueError`` when a checkpoint's weights are not this model's (another architecture)."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(mine.keys() - weights.keys()), sorted(weights.keys() - mine.keys())
    reshaped = sorted(k for k in mine.keys() & weights.keys() if tuple(weights[k].shape) != mine[k])
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise ValueError(
            f"checkpoint {path} holds another model ({len(missing)} tensor(s) missing, {len(unexpected)} unexpected,"
            f" {len(reshaped)} of another shape, e.g. {example}): it was trained with another model config;"
            " start over with --resume none or use another --out"
        )


def resume_loop(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[dict, int, dict, float]:
    """What a trainer's loop resumes from a checkpoint: weights, optimizer, RNG and loss scaler loaded; returns
    (state.json, step, metrics history, training seconds so far). One-line ``ValueError`` on a damaged one."""
    doc = load_checkpoint(path, model, optimizer)
    step, history, train_seconds, scaler_state = resume_fields(doc, path, *LOOP_FIELDS)
    load_scaler(scaler, scaler_state)
    return doc, step, history, train_seconds


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state, and RNG states) from a checkpoint directory; returns its state.json.

    Weights of another architecture, or a damaged checkpoint, are a one-line ``ValueError`` before anything is
    loaded. The optimizer keeps this run's settings (betas, weight decay, eps, ...): only its state (the moments
    and step counts) comes from the checkpoint, so a resume with a new ``--weight-decay`` trains with it, as its
    saved config says."""
    path = Path(path)
    doc = read_state(path)
    if (why := damage(path)) is not None:
        raise ValueError(f"{path}: damaged checkpoint ({why}); resume from another, or start over with --resume none")
    model = getattr(model, "module", model)
    weights = load_file(str(path / "model.safetensors"), device="cpu")
    check_fits(path, model, weights)
    model.load_state_dict(weights)
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"), device="cpu")
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(optimizer_from_flat(doc["optimizer"], tensors))
        for group, mine in zip(optimizer.param_groups, settings, strict=True):
            group.update(mine)
        match_param_layout(optimizer)
        set_rng_state(doc["rng"], load_file(str(path / "rng.safetensors"), device="cpu"))
    return doc
