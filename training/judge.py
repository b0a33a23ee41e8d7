"""The judge: a small CNN that names the colour and the shape of a one-shape demo image, independent of the generator.

It learns from real demo renders (``pipeline.demo_site.render_scene`` of random one-shape scenes: every variant,
size, position and background) with their ground-truth attributes, and is trusted only when its accuracy on
held-out real renders reaches :data:`TRUST_ACCURACY` for both heads. Prompt accuracy of the diffusion model is
then measured by asking the judge what each generated image shows.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.demo_site import COLOURS, SHAPES
from pipeline.demo_site.scenes import random_scene, render_scene

TRUST_ACCURACY = 0.98  # held-out accuracy both heads must reach before the judge's verdicts count
JUDGE_CONFIG = "judge_config.json"
JUDGE_WEIGHTS = "judge.safetensors"


@dataclass(frozen=True)
class JudgeConfig:
    """How the judge is built and trained."""

    size: int = 32  # pixels, square input side (the generator's resolution); other sizes are resized to it
    width: int = 16  # channels of the first conv layer (doubles twice)
    n_train: int = 16000  # rendered training scenes (drawn once, then reused for every epoch)
    n_eval: int = 2000  # rendered held-out scenes (another seed)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 4e-3  # peak AdamW learning rate (one-cycle: linear warmup, cosine decay)
    weight_decay: float = 1e-4
    blur_p: float = 0.3  # share of training images blurred a little (generated images are softer than renders)
    noise_std: float = 4.0  # max std of added Gaussian pixel noise, in 0..255 units
    seed: int = 0  # training scenes use seed, held-out scenes seed + 1_000_003
    threads: int = 1  # torch CPU threads while training


class JudgeNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) with avg+max pooling and a colour head and a shape head."""

    def __init__(self, width: int = 16, n_colours: int = len(COLOURS), n_shapes: int = len(SHAPES)):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w),
            _conv(w, w),
            nn.MaxPool2d(2),
            _conv(w, 2 * w),
            _conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv(4 * w, 4 * w),
        )
        self.colour = nn.Linear(8 * w, n_colours)
        self.shape = nn.Linear(8 * w, n_shapes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] ``(n, 3, s, s)`` -> (colour logits, shape logits)."""
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.colour(h), self.shape(h)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@dataclass
class Judge:
    """A trained judge with its config and the held-out accuracy it reached."""

    net: JudgeNet
    cfg: JudgeConfig
    report: dict  # held-out accuracy per head, training time, sizes

    @property
    def trusted(self) -> bool:
        """Whether both heads reached :data:`TRUST_ACCURACY` on held-out real renders."""
        return min(self.report["colour_accuracy"], self.report["shape_accuracy"]) >= TRUST_ACCURACY

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """uint8 ``(n, 3, h, w)`` images -> {"colour": [...], "shape": [...]} names, one per image."""
        self.net.eval()
        colours, shapes = [], []
        for i in range(0, len(images), batch_size):
            c, s = self.net(_prepare(images[i : i + batch_size], self.cfg.size))
            colours += [COLOURS[j] for j in c.argmax(1).tolist()]
            shapes += [SHAPES[j] for j in s.argmax(1).tolist()]
        return {"colour": colours, "shape": shapes}


def _prepare(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images -> float [-1, 1] at ``size`` px (antialiased resize when needed), channels_last, on CPU."""
    x = images.detach().to("cpu", torch.float32) / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


def render_labelled(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random one-shape demo renders as uint8 ``(n, 3, size, size)`` with colour and shape class indices."""
    rng = random.Random(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    colour, shape = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for i in range(n):
        spec = random_scene(rng, p_two=0.0)
        images[i] = np.asarray(render_scene(spec, size))
        colour[i] = COLOURS.index(spec.shapes[0].colour)
        shape[i] = SHAPES.index(spec.shapes[0].shape)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), colour, shape


def _augment(x: torch.Tensor, cfg: JudgeConfig, gen: torch.Generator) -> torch.Tensor:
    """Blur a share of the batch (3x3 binomial kernel), add a little pixel noise: the softness of decoded latents."""
    n = x.shape[0]
    blur = (torch.rand(n, generator=gen) < cfg.blur_p).view(n, 1, 1, 1)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = torch.where(blur, blurred, x)
    std = torch.rand(n, 1, 1, 1, generator=gen) * (cfg.noise_std / 127.5)
    return x + std * torch.randn(x.shape, generator=gen)


def accuracy(judge: Judge, images: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor) -> dict[str, float]:
    """Colour, shape and both-right accuracy of ``judge`` on labelled uint8 images."""
    pred = judge.predict(images)
    c = torch.tensor([COLOURS.index(p) for p in pred["colour"]]) == colour
    s = torch.tensor([SHAPES.index(p) for p in pred["shape"]]) == shape
    return {
        "colour_accuracy": float(c.float().mean()),
        "shape_accuracy": float(s.float().mean()),
        "both_accuracy": float((c & s).float().mean()),
    }


def train_judge(cfg: JudgeConfig = JudgeConfig()) -> Judge:
    """Render labelled scenes, train the judge, and measure it on held-out renders (``judge.report``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        images, colour, shape = render_labelled(cfg.n_train, cfg.size, cfg.seed)
        t_render = time.perf_counter() - t0
        net = JudgeNet(cfg.width).to(memory_format=torch.channels_last)
        steps = cfg.epochs * (cfg.n_train // cfg.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
        gen = torch.Generator().manual_seed(cfg.seed)
        net.train()
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.n_train, generator=gen)
            for i in range(0, cfg.n_train - cfg.batch_size + 1, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = _augment(_prepare(images[idx], cfg.size), cfg, gen).contiguous(memory_format=torch.channels_last)
                logits_c, logits_s = net(x)
                loss = F.cross_entropy(logits_c, colour[idx]) + F.cross_entropy(logits_s, shape[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        t_train, c_train = time.perf_counter() - t1, time.process_time() - c1
        judge = Judge(net.eval(), cfg, {})
        held = render_labelled(cfg.n_eval, cfg.size, cfg.seed + 1_000_003)
        judge.report = {
            **accuracy(judge, *held),
            "n_eval": cfg.n_eval,
            "n_train": cfg.n_train,
            "steps": steps,
            "final_loss": float(loss.detach()),
            "render_seconds": round(t_render, 2),
            "train_seconds": round(t_train, 2),  # wall clock
            "train_cpu_seconds": round(c_train, 2),  # CPU time of this process (what a quiet machine would take)
            "threads": cfg.threads,
        }
        judge.report["trusted"] = judge.trusted
        return judge
    finally:
        torch.set_num_threads(threads)


def save_judge(judge: Judge, out_dir: str | Path) -> Path:
    """Write ``judge.safetensors`` and ``judge_config.json`` (config + held-out report) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in judge.net.state_dict().items()}
    save_file(state, str(out / JUDGE_WEIGHTS))
    meta = {"config": asdict(judge.cfg), "report": judge.report, "colours": list(COLOURS), "shapes": list(SHAPES)}
    (out / JUDGE_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


def load_judge(path: str | Path) -> Judge:
    """Load a judge written by :func:`save_judge`; ``ValueError`` (one line) if it is missing, broken or for other
    labels.

    The held-out accuracy is measured again here, on the same held-out renders (``cfg.n_eval`` at seed + 1_000_003,
    about a second), so whether the judge is trusted rests on its weights, not on the report stored beside them.
    """
    path = Path(path)
    if not (path / JUDGE_CONFIG).is_file() or not (path / JUDGE_WEIGHTS).is_file():
        raise ValueError(f"{path}: not a judge directory (needs {JUDGE_CONFIG} and {JUDGE_WEIGHTS})")
    try:
        meta = json.loads((path / JUDGE_CONFIG).read_text(encoding="utf-8"))
        if tuple(meta["colours"]) != COLOURS or tuple(meta["shapes"]) != SHAPES:
            raise ValueError(f"{path}: the judge was trained on other colour/shape names than the demo site's")
        cfg = JudgeConfig(**meta["config"])
        net = JudgeNet(cfg.width)
        net.load_state_dict(load_file(str(path / JUDGE_WEIGHTS)))
    except ValueError as e:  # the labels above, or JSON that does not parse
        msg = _first_line(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: not a usable judge ({msg})") from None
    except (KeyError, TypeError, AttributeError, RuntimeError, OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a usable judge ({type(e).__name__}: {_first_line(e)})") from None
    judge = Judge(net.eval().to(memory_format=torch.channels_last), cfg, {})
    stored = meta.get("report") if isinstance(meta.get("report"), dict) else {}
    measured = accuracy(judge, *render_labelled(cfg.n_eval, cfg.size, cfg.seed + 1_000_003))
    judge.report = {**stored, **measured, "n_eval": cfg.n_eval, "measured_at_load": True}
    judge.report["stored_accuracy"] = {k: stored.get(k) for k in ("colour_accuracy", "shape_accuracy")}
    judge.report["trusted"] = judge.trusted
    return judge


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [repr(e)])[0]
