"""``altforge scrape --url-list`` against img2dataset on the same URL list, same settings, same machine.

    python benchmarks/scrape_vs_img2dataset.py                       # 5,000 URLs, 3 alternating runs per series
    python benchmarks/scrape_vs_img2dataset.py --runs 2 --skip-rss   # quicker
    python benchmarks/scrape_vs_img2dataset.py --markdown notes.md   # also write the results as markdown

What it does, in order:

1. creates ``benchmarks/.venv-img2dataset`` and pip-installs img2dataset there (once);
2. generates a seeded corpus of web-like images (see ``_imageserver.py``), cached under ``--cache-dir``;
3. serves it from a separate process on 127.0.0.1 and measures the server alone with a trivial client;
4. writes the URL list (parquet: url, caption), runs one untimed warm-up of each tool, then alternates timed runs of
   ``altforge`` (Prefect's temporary server started and stopped by the command, the default), ``altforge+server``
   (against a Prefect server this script starts first, as a deployment has) and img2dataset; each run is the whole
   command line, start-up included;
5. counts successes (our manifest / img2dataset's ``*_stats.json``), compares 50 images present in both outputs
   against a Lanczos reference resize of the original (sizes must match; PSNR of each);
6. measures the peak RSS of ``altforge scrape`` on a 1,000,000-row list while it plans and scrapes two shards.

Equivalent settings: 256 px, smaller side to 256 with the ratio kept, never upscaled (ours: default
``upscale=False``; img2dataset: ``--resize_only_if_bigger True``), JPEG quality 95, 2 processes, the same records
per shard. Neither tool reaches any address but the loopback server: proxies are cleared, wandb is off, hubs offline.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _imageserver import ImageServer, build_corpus, measure_server  # noqa: E402
from _procwatch import PrefectServer, Watch, loadavg, machine_info, offline_env, timed_run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
I2D_VENV = os.path.join(HERE, ".venv-img2dataset")
I2D_VERSION = "1.47.0"
ALTFORGE = os.path.join(os.path.dirname(sys.executable), "altforge")


# ------------------------------------------------------------------------------------------------ environment


def ensure_img2dataset(venv: str = I2D_VENV) -> str:
    """Create ``venv`` with img2dataset installed (once); returns its console script."""
    exe = os.path.join(venv, "bin", "img2dataset")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = os.path.join(venv, "bin", "pip")
        subprocess.run([pip, "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return exe


# ------------------------------------------------------------------------------------------------ the two tools


def ours_cmd(url_list: str, out: str, shard_size: int, processes: int) -> list[str]:
    """``altforge scrape`` with the benchmark's settings."""
    return [
        ALTFORGE, "scrape", "--url-list", url_list, "--out", out, "--image-size", "256", "--resize", "keep_ratio",
        "--encode-quality", "95", "--processes", str(processes), "--shard-size", str(shard_size),
        "--allow-private-network",
    ]  # fmt: skip


def theirs_cmd(exe: str, url_list: str, out: str, shard_size: int, processes: int, threads: int) -> list[str]:
    """img2dataset with the same settings (keep_ratio, never upscale, 256 px, JPEG q95, webdataset)."""
    return [
        exe, "--url_list", url_list, "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption",
        "--output_format", "webdataset", "--output_folder", out, "--processes_count", str(processes),
        "--thread_count", str(threads), "--image_size", "256", "--resize_mode", "keep_ratio",
        "--resize_only_if_bigger", "True", "--encode_format", "jpg", "--encode_quality", "95",
        "--number_sample_per_shard", str(shard_size), "--enable_wandb", "False",
    ]  # fmt: skip


def ours_successes(out: str) -> tuple[int, dict]:
    """Kept images and drop reasons from our manifest."""
    with open(os.path.join(out, "manifest.json")) as f:
        st = json.load(f)["stats"]
    return st["kept"], dict(st["dropped"])


def theirs_successes(out: str) -> tuple[int, dict]:
    """Successes and failure messages summed over img2dataset's ``*_stats.json``."""
    ok, fails = 0, {}
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            st = json.load(f)
        ok += st["successes"]
        for msg, n in (st.get("status_dict") or {}).items():
            if msg != "success":
                short = msg.split(":")[0][:40]
                fails[short] = fails.get(short, 0) + n
    return ok, fails


def write_url_list(path: str, urls: list[str], captions: list[str]) -> None:
    """A parquet URL list with ``url`` and ``caption`` columns (img2dataset reads the same file)."""
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def write_big_url_list(path: str, urls: list[str], captions: list[str], rows: int) -> None:
    """``rows`` rows repeating ``urls`` with unique ``?i=N`` queries, written in 100k-row groups (streamable)."""
    schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, 100_000):
            idx = range(start, min(rows, start + 100_000))
            w.write_table(
                pa.table(
                    {
                        "url": [f"{urls[i % len(urls)]}?i={i}" for i in idx],
                        "caption": [captions[i % len(captions)] for i in idx],
                    },
                    schema=schema,
                ),
                row_group_size=100_000,
            )


# ------------------------------------------------------------------------------------------------ quality


def _rgb(img: Image.Image) -> Image.Image:
    """Full decode to RGB, alpha composited on white (both tools' background)."""
    img.load()
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two same-size RGB images (8 bit)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _ours_index(out: str) -> dict[str, tuple[str, str, tuple]]:
    """url -> (tar path, key, (w, h)) of our successes."""
    idx = {}
    for path in sorted(glob.glob(os.path.join(out, "[0-9]" * 6 + ".parquet"))):
        t = pq.read_table(path, columns=["key", "url", "status", "width", "height"]).to_pylist()
        tar = path.removesuffix(".parquet") + ".tar"
        for r in t:
            if r["status"] == "success":
                idx[r["url"]] = (tar, r["key"], (r["width"], r["height"]))
    return idx


def _theirs_index(out: str) -> dict[str, tuple[str, str, tuple]]:
    """url -> (tar path, key, (w, h)) of img2dataset's successes."""
    idx = {}
    for path in sorted(glob.glob(os.path.join(out, "*.parquet"))):
        t = pq.read_table(path, columns=["key", "url", "status", "width", "height"]).to_pylist()
        tar = path.removesuffix(".parquet") + ".tar"
        for r in t:
            if r["status"] == "success":
                idx[r["url"]] = (tar, r["key"], (r["width"], r["height"]))
    return idx


def _read_members(wanted: dict[str, set[str]]) -> dict[tuple[str, str], bytes]:
    """(tar, key) -> jpg bytes for the wanted keys of each tar."""
    got = {}
    for tar, keys in wanted.items():
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                if ext == "jpg" and key in keys:
                    got[(tar, key)] = tf.extractfile(m).read()
    return got


def quality_check(ours_out: str, theirs_out: str, corpus_root: str, url_to_name: dict, n: int = 50) -> dict:
    """Sizes of every common success, and PSNR against a full-decode Lanczos reference on ``n`` of them."""
    ours, theirs = _ours_index(ours_out), _theirs_index(theirs_out)
    common = sorted(set(ours) & set(theirs))
    size_mismatch = [u for u in common if tuple(ours[u][2]) != tuple(theirs[u][2])]
    sample = random.Random(0).sample(common, min(n, len(common)))
    want_o, want_t = {}, {}
    for u in sample:
        want_o.setdefault(ours[u][0], set()).add(ours[u][1])
        want_t.setdefault(theirs[u][0], set()).add(theirs[u][1])
    bo, bt = _read_members(want_o), _read_members(want_t)
    rows = []
    for u in sample:
        a = Image.open(io.BytesIO(bo[(ours[u][0], ours[u][1])])).convert("RGB")
        b = Image.open(io.BytesIO(bt[(theirs[u][0], theirs[u][1])])).convert("RGB")
        with Image.open(os.path.join(corpus_root, "img", url_to_name[u.split("?", 1)[0]])) as orig:
            src = _rgb(orig)
        ref_a = src if src.size == a.size else src.resize(a.size, Image.Resampling.LANCZOS)
        ref_b = src if src.size == b.size else src.resize(b.size, Image.Resampling.LANCZOS)
        rows.append(
            {"url": u, "same_size": a.size == b.size, "psnr_ours": psnr(a, ref_a), "psnr_theirs": psnr(b, ref_b)}
        )
    return {
        "common_successes": len(common),
        "only_ours": len(set(ours) - set(theirs)),
        "only_theirs": len(set(theirs) - set(ours)),
        "size_mismatches_all": len(size_mismatch),
        "size_mismatch_examples": size_mismatch[:3],
        "sampled": len(rows),
        "sample_same_size": sum(r["same_size"] for r in rows),
        "psnr_ours_mean": statistics.fmean(r["psnr_ours"] for r in rows),
        "psnr_theirs_mean": statistics.fmean(r["psnr_theirs"] for r in rows),
        "psnr_ours_min": min(r["psnr_ours"] for r in rows),
        "psnr_theirs_min": min(r["psnr_theirs"] for r in rows),
    }


# ------------------------------------------------------------------------------------------------ memory on 1M rows


def rss_big_list(url_list: str, out: str, env: dict, log: str, stop_after_shards: int, timeout: float) -> dict:
    """Peak RSS of ``altforge scrape`` on a huge list: planning, then scraping until ``stop_after_shards`` are done."""
    cmd = ours_cmd(url_list, out, 10_000, 2)
    plan_json = os.path.join(out, "_inputs", "plan.json")
    t0 = time.monotonic()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        watch = Watch(proc.pid)
        watch.phase, plan_s, done_shards = "plan", None, 0
        try:
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                watch.sample()
                if plan_s is None and os.path.exists(plan_json):
                    plan_s, watch.phase = time.monotonic() - t0, "scrape"
                    plan_hwm = watch.main_hwm_kb
                if plan_s is not None:
                    done_shards = len(glob.glob(os.path.join(out, "*_stats.json")))
                    if done_shards >= stop_after_shards:
                        break
                time.sleep(0.1)
            scrape_s = time.monotonic() - t0 - (plan_s or 0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    kept = 0
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            kept += json.load(f)["kept"]
    plan = json.load(open(plan_json)) if os.path.exists(plan_json) else {}
    return {
        "records_planned": plan.get("records"),
        "partitions": len(plan.get("partitions", [])),
        "plan_s": plan_s,
        "plan_main_hwm_mb": (plan_hwm / 1024) if plan_s is not None else None,
        "plan_peak_tree_mb": watch.peak_tree_kb.get("plan", 0) / 1024,
        "scrape_peak_tree_mb": watch.peak_tree_kb.get("scrape", 0) / 1024,
        "scrape_peak_proc_mb": watch.peak_proc_kb.get("scrape", 0) / 1024,
        "main_hwm_mb": watch.main_hwm_kb / 1024,
        "shards_done": done_shards,
        "images_kept": kept,
        "scrape_s": scrape_s,
    }


# ------------------------------------------------------------------------------------------------ report

OURS, OURS_SERVER, THEIRS = "altforge", "altforge+server", "img2dataset"


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summarize(runs: list[dict]) -> dict:
    """Per tool: median and range of images/s and images/CPU-s; ratios of each altforge series to img2dataset."""
    out = {}
    for tool in dict.fromkeys(r["tool"] for r in runs):
        ips = [r["images_per_s"] for r in runs if r["tool"] == tool]
        cps = [r["images_per_cpu_s"] for r in runs if r["tool"] == tool]
        first = [r["first_image_s"] for r in runs if r["tool"] == tool and r["first_image_s"] is not None]
        out[tool] = {
            "ips": statistics.median(ips),
            "ips_range": f"{min(ips):.1f}-{max(ips):.1f}",
            "cps": statistics.median(cps),
            "first_image_s": statistics.median(first) if first else None,
            "fails": next(r["fails"] for r in runs if r["tool"] == tool),
        }
    theirs = [r["images_per_s"] for r in runs if r["tool"] == THEIRS]
    for tool, st in out.items():
        if tool != THEIRS:
            mine = [r["images_per_s"] for r in runs if r["tool"] == tool]
            st["ratio"] = st["ips"] / out[THEIRS]["ips"]
            st["cpu_ratio"] = st["cps"] / out[THEIRS]["cps"]
            st["pair_ratios"] = ", ".join(f"{a / b:.2f}" for a, b in zip(mine, theirs, strict=False))
    return out


def report_markdown(args, info: dict, server: dict, runs: list[dict], summary: dict, quality: dict, rss: dict) -> str:
    """The results as a markdown snippet for BENCHMARKS.md."""
    lines = [
        f"### Scrape: altforge vs img2dataset {I2D_VERSION} ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {info['nproc']} cores ({info['cpu']}), Linux {info['kernel']}, shared with other jobs"
        " (load averages below); `free -g`:",
        "",
        "```",
        info["free_g"],
        "```",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Corpus: {args.n_images} images x {args.repeat} = {args.n_images * args.repeat} URLs (seed {args.seed}):"
        " JPEG/PNG/WebP 60/25/15, long side uniform in 64-1024 px, 2% truncated, 3% 404; served from memory by"
        f" aiohttp in its own process on 127.0.0.1 ({server['requests_per_s']:.0f} req/s,"
        f" {server['mb_per_s']:.0f} MB/s to a trivial 64-connection client).",
        "Settings, both tools: 256 px, keep_ratio (smaller side 256), never upscale, JPEG q95, 2 processes,"
        f" {args.shard_size} records per shard; img2dataset `--thread_count {args.threads}`, altforge 64 requests"
        " in flight per process (its default). Wall time is the whole command: `altforge` includes starting and"
        " stopping Prefect's temporary server; `altforge+server` runs against a Prefect server started before the"
        " runs (`PREFECT_API_URL`, as a deployment has; that server's CPU is not counted). Runs alternate.",
        "",
        "| run | tool | load avg before | wall s | first image s | successes | images/s | CPU s | images/CPU-s |"
        " peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['run']} | {r['tool']} | {r['load']} | {r['wall_s']:.1f} | {_fmt(r['first_image_s'])} |"
            f" {r['successes']} | {r['images_per_s']:.1f} | {r['cpu_s']:.1f} | {r['images_per_cpu_s']:.1f} |"
            f" {r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "| tool | median images/s (range) | vs img2dataset | per-run ratios | images/CPU-s | vs img2dataset |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for tool, st in summary.items():
        lines.append(
            f"| {tool} | {st['ips']:.1f} ({st['ips_range']}) | {_ratio(st.get('ratio'))} |"
            f" {st.get('pair_ratios', '-')} | {st['cps']:.1f} | {_ratio(st.get('cpu_ratio'))} |"
        )
    lines += [
        "",
        "Failures: " + "; ".join(f"{tool}: {st['fails']}" for tool, st in summary.items()) + ".",
        "",
        f"Quality ({OURS} vs {THEIRS}, last runs): {quality['common_successes']} URLs succeeded in both"
        f" ({quality['only_ours']} only in altforge, {quality['only_theirs']} only in img2dataset); output sizes"
        f" differ for {quality['size_mismatches_all']} of them. On {quality['sampled']} sampled images, PSNR"
        f" against a full-decode Lanczos resize of the original: altforge {quality['psnr_ours_mean']:.2f} dB mean"
        f" (min {quality['psnr_ours_min']:.2f}), img2dataset {quality['psnr_theirs_mean']:.2f} dB mean"
        f" (min {quality['psnr_theirs_min']:.2f}).",
    ]
    if rss:
        lines += [
            "",
            f"Memory on a {rss['records_planned'] or args.rss_rows:,}-row list (`--shard-size 10000`): planning"
            f" {rss['partitions']} partitions took {_fmt(rss['plan_s'])} s from the command's start, with the main"
            f" process at {_fmt(rss['plan_main_hwm_mb'], '.0f')} MB peak (whole process tree"
            f" {rss['plan_peak_tree_mb']:.0f} MB, Prefect's temporary server included); scraping"
            f" {rss['shards_done']} shards ({rss['images_kept']} images) peaked at {rss['scrape_peak_tree_mb']:.0f}"
            f" MB for the tree, {rss['scrape_peak_proc_mb']:.0f} MB for the largest process.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the whole benchmark; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=5000, help="distinct images (and URLs, with --repeat 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="list each image this many times (unique ?i=N queries)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each tool, alternating")
    ap.add_argument("--shard-size", type=int, default=500, help="records per shard, both tools")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=64, help="img2dataset --thread_count")
    ap.add_argument("--hosts", type=int, default=1, help="serve on 127.0.0.1..127.0.0.N (URLs round-robin)")
    ap.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "altforge-bench-scrape"))
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--no-prefect-server", action="store_true", help="skip the altforge+server series")
    ap.add_argument("--skip-rss", action="store_true", help="skip the 1M-row memory measurement")
    ap.add_argument("--rss-rows", type=int, default=1_000_000)
    ap.add_argument("--rss-shards", type=int, default=2, help="stop the memory run after this many shards")
    ap.add_argument("--markdown", help="also write the markdown snippet here")
    args = ap.parse_args()

    info = machine_info()
    print(f"machine: {info['nproc']} x {info['cpu']}; load {loadavg()}", flush=True)
    exe = ensure_img2dataset()
    os.makedirs(args.cache_dir, exist_ok=True)
    t = time.monotonic()
    corpus_root, items = build_corpus(args.cache_dir, args.n_images, args.seed)
    print(f"corpus: {len(items)} items in {corpus_root} ({time.monotonic() - t:.1f} s)", flush=True)
    work = tempfile.mkdtemp(prefix="run-", dir=args.cache_dir)
    envs = {OURS: offline_env({"PREFECT_HOME": os.path.join(args.cache_dir, "prefect-home")}), THEIRS: offline_env()}
    tools = [OURS] + ([] if args.no_prefect_server else [OURS_SERVER]) + [THEIRS]
    prefect_server = None
    if OURS_SERVER in tools:
        home = os.path.join(args.cache_dir, "prefect-server-home")
        os.makedirs(home, exist_ok=True)
        prefect_server = PrefectServer(home)
        envs[OURS_SERVER] = offline_env({"PREFECT_HOME": home, "PREFECT_API_URL": prefect_server.api_url})

    try:
        with ImageServer(corpus_root, hosts=args.hosts) as srv:
            urls = [srv.url(it.name, i) for i, it in enumerate(items)]
            captions = [it.caption for it in items]
            url_to_name = {u: it.name for u, it in zip(urls, items, strict=True)}
            ok_urls = [u for u, it in zip(urls, items, strict=True) if it.kind == "ok"]
            server = measure_server(ok_urls, seconds=5.0)
            print(f"server alone: {server['requests_per_s']:.0f} req/s, {server['mb_per_s']:.0f} MB/s", flush=True)
            url_list = os.path.join(work, "urls.parquet")
            if args.repeat > 1:
                write_big_url_list(url_list, urls, captions, len(urls) * args.repeat)
            else:
                write_url_list(url_list, urls, captions)

            def run(tool: str, label: str) -> dict:
                out = os.path.join(work, f"{tool}-{label}")
                shutil.rmtree(out, ignore_errors=True)
                load = loadavg()
                if tool == THEIRS:
                    cmd = theirs_cmd(exe, url_list, out, args.shard_size, args.processes, args.threads)
                else:
                    cmd = ours_cmd(url_list, out, args.shard_size, args.processes)
                r = timed_run(cmd, out, envs[tool], out + ".log")
                ok, fails = theirs_successes(out) if tool == THEIRS else ours_successes(out)
                r.update(run=label, tool=tool, load=load, successes=ok, fails=fails, out=out)
                r["images_per_s"] = ok / r["wall_s"]
                r["images_per_cpu_s"] = ok / r["cpu_s"]
                print(
                    f"  {label:>6} {tool:<15} load {load:<15} wall {r['wall_s']:6.1f} s  first image"
                    f" {_fmt(r['first_image_s']):>5} s  {ok} ok  {r['images_per_s']:6.1f} img/s"
                    f"  CPU {r['cpu_s']:5.1f} s  peak RSS {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                return r

            if not args.no_warmup:
                print("warm-up (not counted):", flush=True)
                for tool in tools:
                    run(tool, "warmup")
            print("timed runs:", flush=True)
            runs = [run(tool, str(k + 1)) for k in range(args.runs) for tool in tools]
            summary = summarize(runs)
            for tool, st in summary.items():
                print(f"{tool}: {json.dumps(st)}", flush=True)
            last = {r["tool"]: r["out"] for r in runs}
            quality = quality_check(last[OURS], last[THEIRS], corpus_root, url_to_name)
            print("quality:", json.dumps(quality), flush=True)

            rss = {}
            if not args.skip_rss:
                big = os.path.join(work, f"urls-{args.rss_rows}.parquet")
                write_big_url_list(big, urls, captions, args.rss_rows)
                out = os.path.join(work, "altforge-big")
                rss = rss_big_list(big, out, envs[OURS], out + ".log", args.rss_shards, timeout=900)
                print("memory:", json.dumps(rss), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if prefect_server is not None:
            prefect_server.close()

    md = report_markdown(args, info, server, runs, summary, quality, rss)
    print("\n" + md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    for r in runs:
        shutil.rmtree(r["out"], ignore_errors=True)


if __name__ == "__main__":
    main()
