"""The review report: one self-contained static page (``review/index.html``) a person reads before a release.

Funnel with overlaps, CLIP score histogram and threshold table/slider, samples on both sides of the cut,
galleries of kept and dropped samples per reason, duplicate clusters, zero-shot tags before/after, and the keys
that entered or left since a previous curated version. Thumbnails are embedded as data URIs; nothing is fetched.
Every count on the page comes from the manifest, and carries a ``data-stat`` attribute so tests can compare.
"""

from __future__ import annotations

import base64
import html
import io
import json
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline import shards, storage, versions
from pipeline.curate.select import SCORE_REASON
from pipeline.curate.tags import tag_distribution
from pipeline.images import to_rgb

TEMPLATE = Path(__file__).with_name("report.html")
GALLERY = 18  # samples per gallery
NEAR_CUT = 12  # samples on each side of the cut
CLUSTERS = 12  # duplicate clusters shown per dedup kind
CLUSTER_MEMBERS = 12  # members shown per cluster, then "… and N more"
THUMB = 128  # px, longest side of an embedded thumbnail
CAPTION_CHARS = 300  # characters of a caption shown on a card


def esc(x) -> str:
    """HTML-escaped text."""
    return html.escape(str(x), quote=True)


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "0.0%"


def thumbnail(data: bytes) -> str:
    """A data URI of a small JPEG of the image (the original bytes when already small; browsers apply their EXIF
    orientation), upright, with transparency on white and 16-bit grey scaled as the scraper does."""
    with Image.open(io.BytesIO(data)) as im:
        if max(im.size) <= THUMB and im.format == "JPEG":
            return "data:image/jpeg;base64," + base64.b64encode(data).decode()
        im = to_rgb(ImageOps.exif_transpose(im), (255, 255, 255))
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def load_thumbnails(srcs: dict[str, str], table, keys: set[str], storage_options: dict | None = None) -> dict:
    """key -> data URI for the wanted keys, reading only the source shards that hold them, each only as far as its
    last wanted sample (a report shows a few dozen cards; a web-scale shard holds thousands of images)."""
    out = {}
    want = table[table["key"].isin(keys)]
    for stem in dict.fromkeys(want["shard"]):
        wanted = set(want.loc[want["shard"] == stem, "key"])
        for s in shards.iter_samples(srcs[stem], storage_options, decode=False):
            key = shards.without_lone_surrogates(s["__key__"])  # as the score table has it
            if key in wanted:
                wanted.discard(key)
                img = shards.first_image(s)
                if img is not None:
                    try:
                        out[key] = thumbnail(img)
                    except Exception:  # an undecodable image shows as a caption-only card
                        pass
                if not wanted:
                    break
    return out


def card(r, thumbs: dict, kept: bool = False, note: str = "") -> str:
    """One sample: image, score, caption, and why it was dropped."""
    score = r["clip_score"]
    s = "n/a" if score is None or np.isnan(score) else f"{score:.3f}"
    img = f'<img alt="{esc(r["key"])}" src="{thumbs[r["key"]]}">' if r["key"] in thumbs else "<div>(no image)</div>"
    why = note or (r["detail"] if isinstance(r.get("detail"), str) else "")
    return (
        f'<div class="card{" kept" if kept else ""}" data-key="{esc(r["key"])}">{img}'
        f'<div><span class="score">{s}</span> <code>{esc(r["key"])}</code></div>'
        f'<div class="cap">{esc(_shown(r["caption"]))}</div><div class="muted">{esc(why)}</div></div>'
    )


def _shown(caption, limit: int = CAPTION_CHARS) -> str:
    """A caption as a card shows it: cut to ``limit`` characters with its length said (a page of 300 kB captions
    would not open)."""
    text = "" if caption is None else str(caption)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def _spread(df, n: int):
    """Up to n rows spread evenly over df's order (for galleries that show the whole range)."""
    if len(df) <= n:
        return df
    return df.iloc[np.linspace(0, len(df) - 1, n).round().astype(int)]


def histogram_svg(scores: np.ndarray, kept_scores: np.ndarray, cut: float, bins: int = 40) -> str:
    """An inline SVG histogram of all scores (blue) and kept ones (green), with the cut as a red line."""
    s = scores[~np.isnan(scores)]
    if len(s) == 0:
        return "<p>No scores.</p>"
    lo, hi = float(s.min()), float(s.max())
    hi = hi if hi > lo else lo + 1e-3
    edges = np.linspace(lo, hi, bins + 1)
    h_all, _ = np.histogram(s, edges)
    h_kept, _ = np.histogram(kept_scores, edges)
    w, h, pad = 760, 220, 30
    bw = (w - 2 * pad) / bins
    top = max(1, int(h_all.max()))
    parts = [f'<svg id="histogram" width="{w}" height="{h + 40}" role="img" aria-label="CLIP score histogram">']
    for i, (a, k) in enumerate(zip(h_all, h_kept, strict=True)):
        x = pad + i * bw
        for cls, v in (("bar", a), ("bar kept", k)):
            bh = (h - pad) * v / top
            parts.append(f'<rect class="{cls}" x="{x:.1f}" y="{h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}">')
            parts.append(f"<title>{edges[i]:.3f} to {edges[i + 1]:.3f}: {v}</title></rect>")
    if np.isfinite(cut) and lo <= cut <= hi:
        cx = pad + (cut - lo) / (hi - lo) * (w - 2 * pad)
        parts.append(f'<line class="cut" x1="{cx:.1f}" x2="{cx:.1f}" y1="{pad / 2}" y2="{h}"></line>')
        parts.append(f'<text x="{cx + 4:.1f}" y="{pad:.1f}" fill="#c33">cut {cut:.3f}</text>')
    for v in np.linspace(lo, hi, 6):
        x = pad + (v - lo) / (hi - lo) * (w - 2 * pad)
        parts.append(f'<text x="{x - 14:.1f}" y="{h + 18}" font-size="11">{v:.2f}</text>')
    parts.append(f'<text x="{pad}" y="{h + 36}" font-size="11">cosine similarity; max bin {top} samples</text></svg>')
    return "".join(parts)


def funnel_html(manifest: dict) -> str:
    """The funnel table: each filter alone vs in order, with shares of the input."""
    seen = manifest["stats"]["seen"]
    rows = [
        "<table id='funnel'><tr><th>filter (in order)</th><th>would drop alone</th><th>dropped in order</th>"
        "<th>share of input</th><th>of those alone, dropped earlier</th><th>remaining</th></tr>",
        f"<tr><td>input samples</td><td></td><td></td><td></td><td></td><td data-stat='seen'>{seen}</td></tr>",
    ]
    for f in manifest["funnel"]:
        r = esc(f["reason"])
        rows.append(
            f"<tr><td><code>{r}</code></td><td data-stat='alone.{r}'>{f['alone']}</td>"
            f"<td data-stat='dropped.{r}'>{f['dropped']}</td><td>{_pct(f['dropped'], seen)}</td>"
            f"<td data-stat='earlier.{r}'>{f.get('caught_earlier', '')}</td>"
            f"<td data-stat='remaining.{r}'>{f['remaining']}</td></tr>"
        )
    kept = manifest["stats"]["kept"]
    rows.append(
        f"<tr><th>kept</th><td></td><td></td><th>{_pct(kept, seen)}</th><td></td><th data-stat='kept'>{kept}</th>"
    )
    rows.append("</tr></table>")
    order = [f["reason"] for f in manifest["funnel"] if f["alone"]]
    ov = manifest["overlap"]
    if len(order) > 1:
        rows.append("<h3>Overlaps: samples both filters would drop on their own</h3><table id='overlap'><tr><th></th>")
        rows += [f"<th><code>{esc(b)}</code></th>" for b in order] + ["</tr>"]
        for a in order:
            rows.append(f"<tr><td><code>{esc(a)}</code></td>" + "".join(f"<td>{ov[a][b]}</td>" for b in order))
            rows.append("</tr>")
        rows.append("</table>")
    return "".join(rows)


def _cut(value) -> str:
    """The CLIP cut as shown: none when nothing reached the score filter."""
    return "none" if value is None or not np.isfinite(value) else f"{value:.4f}"


def threshold_html(pool_scores: np.ndarray, all_scores: np.ndarray, cut: float) -> str:
    """Threshold -> % kept table for a range of cuts, and a slider (quantiles embedded as JSON)."""
    from pipeline.curate.filters import kept_share

    s = pool_scores[~np.isnan(pool_scores)]
    if len(s) == 0:  # the page's script still reads the (empty) quantiles
        empty = json.dumps({"values": [], "pool": 0})
        return f"<p>No scores.</p><script type='application/json' id='score-quantiles'>{empty}</script>"
    ts = np.unique(np.round(np.quantile(s, np.linspace(0.0, 0.9, 10)), 3))
    pool_share, all_share = kept_share(s, ts), kept_share(all_scores, ts)
    rows = ["<table id='thresholds'><tr><th>threshold</th><th>% of pool kept</th><th>% of all scored kept</th></tr>"]
    for t, a, b in zip(ts, pool_share, all_share, strict=True):
        rows.append(f"<tr><td>{t:.3f}</td><td>{100 * a:.1f}%</td><td>{100 * b:.1f}%</td></tr>")
    rows.append("</table>")
    # unrounded, and the slider unsnapped (step any): at its start it reads the applied cut's own count, where a
    # value rounded to 0.001 read a sample more or fewer
    lo, hi = float(s.min()), float(s.max())
    start = min(max(cut, lo), hi)
    q = {"values": [float(v) for v in np.quantile(s, np.linspace(0, 1, min(len(s), 2001)))], "pool": len(s)}
    q["cut"] = start
    rows.append(
        f"<p>Threshold <input id='slider' type='range' min='{lo!r}' max='{hi!r}' step='any' value='{start!r}'>"
        " <span id='slider-t'></span> keeps <span id='slider-out'></span> of the pool (<span id='slider-n'></span>"
        " samples).</p>"
    )
    rows.append(f"<script type='application/json' id='score-quantiles'>{json.dumps(q)}</script>")
    return "".join(rows)


def tags_html(table, kept) -> str:
    """Top-tag counts before and after filtering: what the filters removed, by concept."""
    if "tags" not in table or table["tags"].isna().all():
        return "<p class='muted'>No zero-shot labels in the recipe (<code>curate.tags</code>).</p>"
    before = tag_distribution(list(table["tags"]))
    after = tag_distribution(list(table.loc[kept, "tags"]))
    nb, na = max(1, sum(before.values())), max(1, sum(after.values()))
    rows = ["<table id='tags'><tr><th>top tag</th><th>before</th><th>after</th><th>share before</th>"]
    rows.append("<th>share after</th><th>kept of this tag</th></tr>")
    for label, b in before.most_common():
        a = after.get(label, 0)
        cls = "delta-pos" if a / na >= b / nb else "delta-neg"
        rows.append(
            f"<tr><td>{esc(label)}</td><td>{b}</td><td>{a}</td><td>{_pct(b, nb)}</td>"
            f"<td class='{cls}'>{_pct(a, na)}</td><td>{_pct(a, b)}</td></tr>"
        )
    return "".join(rows) + "</table>"


def diff_html(kept_keys: set[str], previous: str | None, storage_options: dict | None) -> str:
    """Keys that entered and left since the previous curated version (its manifest or directory)."""
    if not previous:
        return "<p class='muted'>No previous version given.</p>"
    old_kept = versions.dataset_keys(previous, storage_options)  # a plain dataset, a manifest or a version
    entered, left = sorted(kept_keys - old_kept), sorted(old_kept - kept_keys)
    out = [
        f"<p>Against <code>{esc(previous)}</code>: <b data-stat='diff.entered'>{len(entered)}</b> keys entered, "
        f"<b data-stat='diff.left'>{len(left)}</b> left, {len(kept_keys & old_kept)} stayed.</p>"
    ]
    for name, keys in (("entered", entered), ("left", left)):
        more = f" … and {len(keys) - 60} more" if len(keys) > 60 else ""
        out.append(f"<p><b>{name}:</b> " + " ".join(f"<code>{esc(k)}</code>" for k in keys[:60]) + more + "</p>")
    return "".join(out)


def render(srcs, table, sel, manifest: dict, storage_options: dict | None = None, previous: str | None = None) -> str:
    """The report page as a string."""
    kept = sel.kept
    scores = table["clip_score"].to_numpy(np.float64)
    t = table.assign(_order=np.arange(len(table)))
    pool = t[(sel.status == "success") | (sel.status == SCORE_REASON)].sort_values("clip_score")
    above = pool[pool["clip_score"] >= sel.threshold].head(NEAR_CUT)
    below = pool[pool["clip_score"] < sel.threshold].tail(NEAR_CUT)[::-1]
    galleries = [("kept", _spread(t[kept].sort_values("clip_score"), GALLERY))]
    for reason in sel.order:
        d = t[sel.status == reason]
        if len(d):
            galleries.append((reason, _spread(d.sort_values("clip_score"), GALLERY)))
    clusters = [c for kind in sel.order for c in [x for x in sel.clusters if x["kind"] == kind][:CLUSTERS]]
    want = set(above["key"]) | set(below["key"]) | {k for _, g in galleries for k in g["key"]}
    want |= {c["kept"] for c in clusters} | {m["key"] for c in clusters for m in c["members"][:CLUSTER_MEMBERS]}
    thumbs = load_thumbnails(srcs, t, want, storage_options)
    by_key = t.set_index("key", drop=False)

    def rec(key):
        return {**by_key.loc[key].to_dict(), "key": key}

    m, stats = manifest, manifest["stats"]
    clip = m["clip"]
    r = m["threshold_rule"]
    if "min_score" in r:
        rule = f"min_score {r['min_score']}"
    else:
        rule = f"top {100 * r['keep_fraction']:g}% of {r['pool']}" + (" (default)" if r.get("default") else "")
    b = [
        f"<h1>Curation review</h1><p class='muted'>{esc(m['dataset'])} · from"
        f" <code>{esc(m.get('parent') or '?')}</code>"
        f" · {esc(m['created_at'])} · code {esc(m['code_version'])}</p>",
        "<nav><a href='#funnel-h'>Funnel</a><a href='#scores-h'>Scores</a><a href='#cut-h'>Near the cut</a>"
        "<a href='#galleries-h'>Galleries</a><a href='#dups-h'>Duplicates</a><a href='#tags-h'>Tags</a>"
        "<a href='#diff-h'>Diff</a></nav>",
        f"<div class='kpi'><b data-stat='seen'>{stats['seen']}</b>input samples</div>"
        f"<div class='kpi'><b data-stat='kept'>{stats['kept']}</b>kept ({_pct(stats['kept'], stats['seen'])})</div>"
        f"<div class='kpi'><b>{len(m['shards'])}</b>shards</div>"
        f"<div class='kpi'><b data-stat='clip_threshold'>{_cut(m['clip_threshold'])}</b>CLIP cut ({esc(rule)})</div>",
        f"<p>CLIP <code>{esc(clip['clip_model'])}</code>, weights <code>{esc(clip['clip_pretrained'])}</code>"
        f" (sha256 <code>{esc((clip['clip_checkpoint_sha256'] or 'n/a')[:16])}</code>), preprocessing"
        f" <code>{esc(clip['clip_preprocess'])}</code>. Thresholds do not transfer between CLIP models: check the"
        " samples on both sides of the cut.</p>",
        "<h2 id='funnel-h'>Funnel</h2>",
        funnel_html(m),
        "<h2 id='scores-h'>CLIP scores</h2>",
        histogram_svg(scores, scores[kept], sel.threshold),
        threshold_html(pool["clip_score"].to_numpy(np.float64), scores, sel.threshold),
        f"<h2 id='cut-h'>Near the cut ({_cut(sel.threshold)})</h2><h3>Just above (kept unless dropped later)</h3>",
        "<div class='grid' id='above-cut'>" + "".join(card(r, thumbs) for r in above.to_dict("records")) + "</div>",
        "<h3>Just below (dropped)</h3><div class='grid' id='below-cut'>",
        "".join(card(r, thumbs) for r in below.to_dict("records")) + "</div>",
        "<h2 id='galleries-h'>Galleries</h2>",
    ]
    for name, g in galleries:
        total = int(kept.sum()) if name == "kept" else int((sel.status == name).sum())
        b.append(f"<h3>{esc(name)} <span class='muted'>({total} samples, {len(g)} shown by score)</span></h3>")
        b.append(f"<div class='grid gallery' data-gallery='{esc(name)}'>")
        b.append("".join(card(r, thumbs, kept=name == "kept") for r in g.to_dict("records")) + "</div>")
    b.append(f"<h2 id='dups-h'>Duplicate clusters <span class='muted'>({len(sel.clusters)} sets)</span></h2>")
    if not sel.clusters:
        b.append("<p class='muted'>No duplicates found.</p>")
    b.append("<div class='clusters'>")
    for c in clusters:
        b.append(f"<div class='cluster'><b>{esc(c['kind'])}</b>: kept <code>{esc(c['kept'])}</code><div class='grid'>")
        head = rec(c["kept"])  # the member of the set that stayed; a later filter (the score cut) may drop it
        ok = head.get("status", "success") == "success"
        b.append(card(head, thumbs, kept=ok, note="kept twin" if ok else f"twin, then dropped: {head.get('status')}"))
        shown = c["members"][:CLUSTER_MEMBERS]
        b.append("".join(card(rec(x["key"]), thumbs, note=x["detail"]) for x in shown) + "</div>")
        if len(c["members"]) > len(shown):
            b.append(f"<p class='muted more'>… and {len(c['members']) - len(shown)} more</p>")
        b.append("</div>")
    b.append("</div>")
    b += ["<h2 id='tags-h'>Zero-shot tags before and after</h2>", tags_html(t, kept)]
    b += [
        "<h2 id='diff-h'>Against the previous version</h2>",
        diff_html(set(t.loc[kept, "key"]), previous, storage_options),
    ]
    page = string.Template(TEMPLATE.read_text(encoding="utf-8"))
    return page.safe_substitute(title=esc(m["dataset"]), body="\n".join(b))


def write_report(
    dst_url: str, srcs, table, sel, manifest: dict, storage_options: dict | None = None, previous: str | None = None
) -> str:
    """Write ``review/index.html`` beside the curated shards; returns its URL."""
    url = storage.join(dst_url, "review", "index.html")
    storage.write_bytes(url, render(srcs, table, sel, manifest, storage_options, previous).encode(), storage_options)
    return url
