"""The demo web site as a deterministic value: pages, images, routes and ground truth, all drawn from one seed."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.demo_site import html as H
from pipeline.demo_site.scenes import (
    SceneSpec,
    describe,
    different_scene,
    random_scene,
    render_scene,
    scene_attributes,
)

KINDS = ("content", "pixel", "icon", "no_alt", "offsite", "missing", "truncated")
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif", "ico": "image/x-icon"}
EXT = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "ico": "ico"}


@dataclass(frozen=True)
class DemoSiteConfig:
    """What the demo site holds; every count derives from ``seed`` and ``n_images``."""

    seed: int = 0
    n_images: int = 3000  # content images (distinct scenes)
    images_per_page: int = 24  # <img> tags in the main part of a gallery page
    mismatch_rate: float = 0.2  # fraction of "content" <img> whose alt text describes another scene
    private_rate: float = 0.03  # fraction of scenes under the robots-disallowed /private/ section
    noai_header_rate: float = 0.03  # fraction of scenes served with "X-Robots-Tag: noai"
    meta_noai_images: int = 8  # scenes on the page with <meta name="robots" content="noai, noimageai">
    no_alt_rate: float = 0.04  # fraction of scenes shown without alt text (no attribute or alt="")
    truncated_rate: float = 0.02  # fraction of scenes served with the body cut in half
    duplicate_rate: float = 0.03  # fraction of scenes that appear again under 1-2 other URLs
    offsite_rate: float = 0.02  # off-site <img> (.invalid hosts), as a fraction of n_images
    missing_rate: float = 0.02  # <img> whose src is a 404, as a fraction of n_images
    min_side: int = 64  # pixels, shortest native side of a scene image
    max_side: int = 384  # pixels, longest native side of a scene image
    cache_images: int = 256  # encoded images kept in the LRU cache

    def __post_init__(self):
        if self.n_images < 20:
            raise ValueError(f"n_images must be at least 20, got {self.n_images}")
        if self.images_per_page < 1 or not 16 <= self.min_side <= self.max_side:
            raise ValueError("images_per_page must be >= 1 and 16 <= min_side <= max_side")
        rates = (self.mismatch_rate, self.private_rate, self.noai_header_rate, self.no_alt_rate)
        rates += (self.truncated_rate, self.duplicate_rate, self.offsite_rate, self.missing_rate)
        if not all(0.0 <= r <= 0.5 for r in rates):
            raise ValueError("every *_rate must lie in [0, 0.5]")


@dataclass(frozen=True)
class SiteImage:
    """One distinct image the server can send (it may sit at several URLs)."""

    image_id: str
    fmt: str  # png | jpeg | webp | gif | ico
    width: int  # pixels
    height: int  # pixels
    spec: SceneSpec | None = None  # None for icons and the tracking pixel
    noai: bool = False  # served with X-Robots-Tag: noai
    truncated: bool = False  # served with only the first half of its bytes


@dataclass(frozen=True)
class Response:
    """What the server sends for one path."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(eq=False)
class DemoSite:
    """The whole site: pages in crawl order, images by id, and the path -> resource table."""

    cfg: DemoSiteConfig
    pages: list[H.Page]
    images: dict[str, SiteImage]
    routes: dict[str, tuple[str, str]]  # path -> ("page", path) | ("image", image_id) | ("text", name)
    sitemap_paths: list[str]
    _sha: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._page_by_path = {p.path: p for p in self.pages}
        self._encoded = functools.lru_cache(maxsize=self.cfg.cache_images)(self._encode)

    def _encode(self, image_id: str) -> bytes:
        img = self.images[image_id]
        pic = render_scene(img.spec, (img.width, img.height)) if img.spec else _chrome_image(image_id, img)
        return encode_image(pic, img.fmt)

    def image_bytes(self, image_id: str) -> bytes:
        """The complete encoded bytes of an image (before any truncation)."""
        return self._encoded(image_id)

    def served_bytes(self, image_id: str) -> bytes:
        """The bytes the server sends for an image (truncated images: the first half)."""
        data = self._encoded(image_id)
        return data[: len(data) // 2] if self.images[image_id].truncated else data

    def sha256(self, image_id: str) -> str:
        """sha256 hex digest of the bytes served for ``image_id``."""
        if image_id not in self._sha:
            self._sha[image_id] = hashlib.sha256(self.served_bytes(image_id)).hexdigest()
        return self._sha[image_id]

    def page_html(self, path: str, origin: str) -> str:
        """The HTML of the page at ``path`` as served from ``origin`` ("http://127.0.0.1:PORT")."""
        return H.page_html(self._page_by_path[path]).replace(H.ORIGIN, origin.rstrip("/"))

    def respond(self, target: str, origin: str) -> Response:
        """The response to a GET of ``target`` (path with optional query; the query is ignored)."""
        origin = origin.rstrip("/")
        path = target.split("?", 1)[0].split("#", 1)[0]
        kind, key = self.routes.get(path, ("", ""))
        if kind == "page":
            return Response(200, "text/html; charset=utf-8", self.page_html(key, origin).encode())
        if kind == "image":
            img = self.images[key]
            headers = (("Cache-Control", "public, max-age=86400"),)
            if img.noai:
                headers += (("X-Robots-Tag", "noai"),)
            return Response(200, FORMATS[img.fmt], self.served_bytes(key), headers)
        if kind == "text" and key == "robots":
            return Response(200, "text/plain; charset=utf-8", H.robots_txt().replace(H.ORIGIN, origin).encode())
        if kind == "text" and key == "sitemap":
            xml = H.sitemap_xml(self.sitemap_paths).replace(H.ORIGIN, origin)
            return Response(200, "application/xml; charset=utf-8", xml.encode())
        if kind == "text" and key == "css":
            return Response(200, "text/css; charset=utf-8", H.SITE_CSS.encode())
        return Response(404, "text/html; charset=utf-8", H.NOT_FOUND_HTML.encode())

    def ground_truth_rows(self, base_url: str) -> list[dict]:
        """One dict per <img> occurrence, in page then document order (schema in write_ground_truth)."""
        origin = base_url.rstrip("/")
        return [self._row(page, tag, origin) for page in self.pages for tag in page.imgs]

    def _row(self, page: H.Page, tag: H.ImgTag, origin: str) -> dict:
        img = self.images.get(tag.image_id) if tag.image_id else None
        local = H.is_local(tag.target)
        if not H.robots_allows(page.path) or (local and not H.robots_allows(tag.target)):
            reason = "robots"
        elif img is not None and img.noai:
            reason = "noai_header"
        elif page.meta_noai:
            reason = "meta_noai"
        else:
            reason = None
        fetchable = img is not None and not img.truncated
        return {
            "page_url": origin + page.path,
            "url": origin + tag.target if local else tag.target,
            "alt": tag.alt,
            "image_id": tag.image_id,
            "kind": tag.kind,
            "matches": tag.matches,
            "attributes": scene_attributes(img.spec) if img is not None and img.spec else None,
            "caption_attributes": scene_attributes(tag.caption_spec) if tag.caption_spec else None,
            "allowed": reason is None,
            "forbidden_reason": reason,
            "fetchable": fetchable,
            "sha256": self.sha256(tag.image_id) if fetchable else None,
            "format": img.fmt if img is not None else None,
            "width": img.width if img is not None else None,
            "height": img.height if img is not None else None,
            "http_status": (200 if img is not None else 404) if local else None,
            "offsite": not local,
        }


def encode_image(pic: Image.Image, fmt: str) -> bytes:
    """Encode deterministically (fixed settings, no metadata)."""
    buf = io.BytesIO()
    if fmt == "png":
        pic.save(buf, "PNG", compress_level=6)
    elif fmt == "jpeg":
        pic.save(buf, "JPEG", quality=88)
    elif fmt == "webp":
        pic.save(buf, "WEBP", quality=85, method=4)
    elif fmt == "gif":
        pic.save(buf, "GIF")
    elif fmt == "ico":
        pic.save(buf, "ICO", sizes=[pic.size])
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


_CHROME_COLOURS = {"icon-logo": (230, 90, 30), "icon-share": (40, 120, 220), "icon-rss": (240, 150, 0)}


def _chrome_image(image_id: str, img: SiteImage) -> Image.Image:
    """The tracking pixel, the favicon and the small UI icons."""
    if image_id == "pixel":
        return Image.new("RGB", (1, 1), (255, 255, 255))
    pic = Image.new("RGB", (img.width, img.height), (255, 255, 255))
    draw = ImageDraw.Draw(pic)
    w, h = img.width - 1, img.height - 1
    draw.rounded_rectangle([0, 0, w, h], radius=max(2, w // 5), fill=_CHROME_COLOURS.get(image_id, (60, 60, 60)))
    draw.line([w * 0.3, h * 0.7, w * 0.7, h * 0.3], fill=(255, 255, 255), width=max(1, w // 8))
    return pic


def _native_size(spec: SceneSpec, rng: random.Random, cfg: DemoSiteConfig) -> tuple[int, int]:
    """Width and height: pairs are laid out along their long side, single shapes are often square."""
    long = rng.randint(cfg.min_side, cfg.max_side)
    horizontal = spec.shapes[0].position in ("left", "right") if len(spec.shapes) == 2 else rng.random() < 0.5
    square = rng.random() < (0.3 if len(spec.shapes) == 2 else 0.5)
    short = long if square else max(cfg.min_side, round(long / rng.uniform(1.2, 1.8)))
    return (long, short) if horizontal else (short, long)


def _count(rate: float, n: int) -> int:
    return max(2, round(rate * n)) if rate > 0 else 0


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def build_site(cfg: DemoSiteConfig) -> DemoSite:
    """Describe the whole site from ``cfg`` (pure and deterministic; renders no image)."""
    rng = random.Random(cfg.seed)
    images: dict[str, SiteImage] = {}
    for i in range(cfg.n_images):
        spec = random_scene(rng)
        fmt = rng.choices(("png", "jpeg", "webp"), weights=(5, 3, 2))[0]
        w, h = _native_size(spec, rng, cfg)
        images[f"s{i:05d}"] = SiteImage(f"s{i:05d}", fmt, w, h, spec)
    for image_id, fmt, side in (("icon-logo", "png", 32), ("icon-share", "png", 16), ("icon-rss", "png", 16)):
        images[image_id] = SiteImage(image_id, fmt, side, side)
    images["pixel"] = SiteImage("pixel", "gif", 1, 1)
    images["favicon"] = SiteImage("favicon", "ico", 16, 16)
    routes: dict[str, tuple[str, str]] = {
        "/robots.txt": ("text", "robots"),
        "/sitemap.xml": ("text", "sitemap"),
        "/static/site.css": ("text", "css"),
        "/favicon.ico": ("image", "favicon"),
        "/static/logo.png": ("image", "icon-logo"),
        "/static/icons/share.png": ("image", "icon-share"),
        "/static/icons/rss.png": ("image", "icon-rss"),
        "/t/pixel.gif": ("image", "pixel"),
    }

    # Roles: slice a shuffled list of scene ids.
    ids = [i for i in images if i.startswith("s")]
    rng.shuffle(ids)
    sizes = [
        _count(cfg.private_rate, cfg.n_images),
        _count(cfg.noai_header_rate, cfg.n_images),
        min(cfg.meta_noai_images, cfg.images_per_page),
        _count(cfg.no_alt_rate, cfg.n_images),
        _count(cfg.truncated_rate, cfg.n_images),
    ]
    bounds = [0, *[sum(sizes[: k + 1]) for k in range(len(sizes))]]
    private, noai, meta, no_alt, truncated = (ids[a:b] for a, b in itertools.pairwise(bounds))
    plain = ids[bounds[-1] :]

    def path_of(image_id: str, folder: str = "/images/") -> str:
        return f"{folder}{image_id}.{EXT[images[image_id].fmt]}"

    for i in noai:
        images[i] = replace(images[i], noai=True)
    for i in truncated:
        images[i] = replace(images[i], truncated=True)
    private_set = set(private)
    for i in ids:
        routes[path_of(i, "/private/img/" if i in private_set else "/images/")] = ("image", i)

    def scene_tag(image_id: str, kind: str = "content", target: str | None = None) -> H.ImgTag:
        img = images[image_id]
        target = target or path_of(image_id)
        form = rng.choices(("root", "relative", "absolute"), weights=(5, 3, 2))[0]
        return H.ImgTag(kind, image_id, target, form=form, width=img.width, height=img.height)

    # Public <img> tags: plain, opt-out, truncated, no-alt, duplicates, a few private images, off-site and 404s.
    public = [scene_tag(i) for i in plain + noai]
    public += [scene_tag(i, "truncated") for i in truncated]
    public += [scene_tag(i, "no_alt") for i in no_alt]
    n_pub_private = max(1, len(private) // 4)
    public += [scene_tag(i, target=path_of(i, "/private/img/")) for i in private[:n_pub_private]]
    for i in rng.sample(plain, min(len(plain), _count(cfg.duplicate_rate, cfg.n_images))):
        cdn = f"/cdn/v1/{rng.getrandbits(64):016x}.{EXT[images[i].fmt]}"
        routes[cdn] = ("image", i)
        variants = [cdn, path_of(i) + "?v=2"]
        public += [scene_tag(i, target=t) for t in variants[: rng.choice((1, 2))]]
    for k in range(_count(cfg.offsite_rate, cfg.n_images)):
        host = rng.choice(("cdn.shop.invalid", "img.partner.example.invalid", "static.ads.invalid"))
        public.append(H.ImgTag("offsite", None, f"http://{host}/img/{k:04d}.jpg", width=200, height=200))
    for k in range(_count(cfg.missing_rate, cfg.n_images)):
        public.append(H.ImgTag("missing", None, f"/images/removed/{k:04d}.png", form=rng.choice(("root", "relative"))))
    rng.shuffle(public)
    private_tags = [scene_tag(i, target=path_of(i, "/private/img/")) for i in private[n_pub_private:]]
    meta_tags = [scene_tag(i) for i in meta]

    # Captions: each content tag is mismatched with probability ~mismatch_rate (an exact share, drawn by sample).
    all_tags = public + private_tags + meta_tags
    content = [t for t in all_tags if t.kind == "content"]
    mismatched = {id(t) for t in rng.sample(content, round(cfg.mismatch_rate * len(content)))}
    for t in all_tags:
        spec = images[t.image_id].spec if t.image_id else random_scene(rng)
        if t.kind == "no_alt":
            t.alt = None if rng.random() < 0.5 else ""
            continue
        t.caption_spec = different_scene(spec, rng) if id(t) in mismatched else spec
        t.alt = describe(t.caption_spec, rng)
        t.matches = id(t) not in mismatched if t.kind in ("content", "truncated") else None
        t.srcset = t.kind == "content" and H.is_local(t.target) and rng.random() < 0.1

    pages = _lay_out_pages(cfg, rng, public, private_tags, meta_tags)
    for page in pages:
        routes[page.path] = ("page", page.path)
    routes["/index.html"] = ("page", "/")
    sitemap = ["/", "/archive.html", "/about.html"] + [p.path for p in pages if p.path.startswith("/gallery/")]
    return DemoSite(cfg, pages, images, routes, sitemap)


def _chrome(rng: random.Random, page_no: int) -> tuple[list[H.ImgTag], list[H.ImgTag]]:
    """Header logo and footer icons/pixel of one page."""
    header = [H.ImgTag("icon", "icon-logo", "/static/logo.png", alt="logo", width=32, height=32, slot="header")]
    footer = []
    if rng.random() < 0.5:
        name = rng.choice(("share", "rss"))
        src = f"/static/icons/{name}.png"
        footer.append(H.ImgTag("icon", f"icon-{name}", src, alt="icon", width=16, height=16, slot="footer"))
    if page_no % 2 == 0:
        alt = rng.choice((None, ""))
        footer.append(
            H.ImgTag("pixel", "pixel", f"/t/pixel.gif?p={page_no}", alt=alt, width=1, height=1, slot="footer")
        )
    return header, footer


def _lay_out_pages(cfg, rng, public, private_tags, meta_tags) -> list[H.Page]:
    """Index, archive, about, gallery pages (prev/next), the private section and the noai members page."""
    galleries = _chunks(public, cfg.images_per_page)
    n = len(galleries)
    main_nav = (("/", "Home"), ("/archive.html", "Archive"), ("/about.html", "About"))
    index = H.Page("/", "Shapes & Colours: a demo gallery", intro="Pictures of coloured shapes.")
    index.links = [*main_nav, *((f"/gallery/{k}.html", f"Gallery {k}") for k in range(1, min(n, 3) + 1))]
    index.links += [("/private/index.html", "Staff only"), ("/special/members.html", "Members")]
    archive = H.Page("/archive.html", "Archive")
    archive.links = [*main_nav, *((f"gallery/{k}.html", f"Page {k}") for k in range(1, n + 1))]
    about = H.Page("/about.html", "About", links=[*main_nav, *((u, "Partner") for u in H.PARTNER_LINKS)])
    pages = [index, archive, about]
    for k, tags in enumerate(galleries, 1):
        page = H.Page(f"/gallery/{k}.html", f"Gallery page {k} of {n}", imgs=tags, links=list(main_nav))
        if k % 5 == 2:
            page.base_href = "/images/archive/"  # deeper than the page: ignoring <base> gives 404s
        gallery = "" if page.base_href is None else "/gallery/"  # relative links would follow <base href>
        if k > 1:
            page.links.append((f"{gallery}{k - 1}.html", "« Previous"))
        if k < n:
            page.links.append((f"{gallery}{k + 1}.html", "Next »"))
        pages.append(page)
    priv = _chunks(private_tags, cfg.images_per_page)
    priv_links = [(f"{k}.html", f"Staff page {k}") for k in range(1, len(priv) + 1)]
    pages.append(H.Page("/private/index.html", "Staff area", links=[*main_nav, *priv_links]))
    for k, tags in enumerate(priv, 1):
        pages.append(H.Page(f"/private/{k}.html", f"Staff page {k}", imgs=tags, links=list(main_nav)))
    members = H.Page("/special/members.html", "Members only", imgs=meta_tags, links=list(main_nav), meta_noai=True)
    pages.append(members)
    for page_no, page in enumerate(pages):
        header, footer = _chrome(rng, page_no)
        page.imgs = header + page.imgs + footer
    return pages


def write_ground_truth(site: DemoSite, path: str | Path, base_url: str) -> int:
    """Write the ground truth as JSONL (one row per <img> occurrence); returns the number of rows."""
    rows = site.ground_truth_rows(base_url)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return len(rows)


def read_ground_truth(path: str | Path) -> list[dict]:
    """Read a ground truth JSONL file written by ``write_ground_truth``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mismatch_share(rows: list[dict]) -> float:
    """Share of "content" rows whose alt text does not describe the image."""
    content = [r for r in rows if r["kind"] == "content"]
    return sum(not r["matches"] for r in content) / max(1, len(content))
