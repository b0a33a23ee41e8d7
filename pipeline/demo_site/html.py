"""HTML, robots.txt and sitemap text of the demo web site (pure string building; the origin is a placeholder)."""

from __future__ import annotations

import html
import posixpath
from dataclasses import dataclass, field

ORIGIN = "{{ORIGIN}}"  # replaced by the serving origin ("http://127.0.0.1:PORT") when a response is made
DISALLOWED_PREFIX = "/private/"  # the section robots.txt disallows
PARTNER_LINKS = (
    "http://partner.example.invalid/page",
    "https://www.example.invalid/",
    "http://shop.invalid/cart?ref=demo",
)


@dataclass
class ImgTag:
    """One ``<img>`` occurrence on a page, and what it truly is."""

    kind: str  # content | no_alt | pixel | icon | offsite | missing | truncated
    image_id: str | None  # key into DemoSite.images; None where no image exists (offsite, missing)
    target: str  # local path (with query) or an absolute off-site URL
    alt: str | None = None  # None = no alt attribute
    form: str = "root"  # how src is written: root | relative | absolute
    caption_spec: object = None  # SceneSpec the alt text was generated from
    matches: bool | None = None
    srcset: bool = False
    width: int | None = None  # HTML width/height attributes, pixels
    height: int | None = None
    slot: str = "main"  # header | main | footer; Page.imgs is kept in document order


@dataclass
class Page:
    """One HTML page: its images in document order and its outgoing links."""

    path: str
    title: str
    imgs: list[ImgTag] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # (href, text) in the nav/pager
    base_href: str | None = None
    meta_noai: bool = False
    intro: str = ""


def robots_allows(path: str) -> bool:
    """Whether the demo site's robots.txt lets a crawler fetch ``path``."""
    return not path.startswith(DISALLOWED_PREFIX)


def is_local(target: str) -> bool:
    """Whether ``target`` is a path on the demo site (not an off-site URL)."""
    return target.startswith("/")


def base_dir(page: Page) -> str:
    """The directory relative URLs on ``page`` resolve against (its <base href> if any)."""
    if page.base_href:
        return page.base_href
    return posixpath.dirname(page.path).rstrip("/") + "/"


def src_for(tag: ImgTag, page: Page, target: str | None = None) -> str:
    """The URL of ``target`` (default: the tag's) written the tag's way (root-relative, relative or absolute)."""
    target = target or tag.target
    if not is_local(target) or tag.form == "root":
        return target
    if tag.form == "absolute":
        return ORIGIN + target
    path, _, query = target.partition("?")
    rel = posixpath.relpath(path, base_dir(page))
    return rel + ("?" + query if query else "")


def _with_query(target: str, extra: str) -> str:
    return target + ("&" if "?" in target else "?") + extra


def img_html(tag: ImgTag, page: Page) -> str:
    """The ``<img>`` element of ``tag`` as it appears on ``page``."""
    parts = [f'<img src="{html.escape(src_for(tag, page))}"']
    if tag.alt is not None:
        parts.append(f'alt="{html.escape(tag.alt, quote=True)}"')
    if tag.srcset:
        two_x = src_for(tag, page, _with_query(tag.target, "dpr=2"))
        parts.append(f'srcset="{html.escape(src_for(tag, page))} 1x, {html.escape(two_x)} 2x"')
    if tag.width:
        parts.append(f'width="{tag.width}" height="{tag.height}"')
    if tag.kind not in ("icon", "pixel"):
        parts.append('loading="lazy"')
    return " ".join(parts) + ">"


def page_html(page: Page) -> str:
    """The full HTML document of ``page`` (with the ORIGIN placeholder for absolute URLs)."""
    head = ['<meta charset="utf-8">', '<meta name="viewport" content="width=device-width, initial-scale=1">']
    head.append(f"<title>{html.escape(page.title)}</title>")
    if page.meta_noai:
        head.append('<meta name="robots" content="noai, noimageai">')
    if page.base_href:
        head.append(f'<base href="{html.escape(page.base_href)}">')
    head += ['<link rel="icon" href="/favicon.ico">', '<link rel="stylesheet" href="/static/site.css">']
    body = []
    header, main, footer = ([t for t in page.imgs if t.slot == slot] for slot in ("header", "main", "footer"))
    logo = " ".join(img_html(t, page) for t in header)
    nav = " | ".join(f'<a href="{html.escape(h)}">{html.escape(text)}</a>' for h, text in page.links)
    body.append(f'<header><a href="/" class="brand">{logo} Shapes &amp; Colours</a>\n<nav>{nav}</nav></header>')
    body.append(f"<main>\n<h1>{html.escape(page.title)}</h1>")
    if page.intro:
        body.append(f"<p>{page.intro}</p>")
    if main:
        body.append('<div class="grid">')
        for k, tag in enumerate(main, 1):
            body.append(f"<figure>{img_html(tag, page)}<figcaption>Item {k}</figcaption></figure>")
        body.append("</div>")
    body.append("</main>")
    partners = " ".join(
        f'<a href="{html.escape(u)}" rel="nofollow">partner {i}</a>' for i, u in enumerate(PARTNER_LINKS)
    )
    footer_imgs = " ".join(img_html(t, page) for t in footer)
    body.append(
        f"<footer>{partners} {footer_imgs}\n<p>&copy; Demo shapes &mdash; all pictures generated.</p></footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n'
        + "\n".join(head)
        + "\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def robots_txt() -> str:
    """robots.txt: everything allowed except the private section; names the sitemap."""
    return f"User-agent: *\nDisallow: {DISALLOWED_PREFIX}\n\nSitemap: {ORIGIN}/sitemap.xml\n"


def sitemap_xml(paths: list[str]) -> str:
    """A sitemaps.org urlset of ``paths``."""
    urls = "".join(f"  <url><loc>{ORIGIN}{html.escape(p)}</loc></url>\n" for p in paths)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n' + urls + "</urlset>\n"
    )


SITE_CSS = (
    "body{font-family:sans-serif;margin:0 2em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
    "figure{margin:4px}figure img{max-width:200px;height:auto}footer{margin-top:2em;color:#666}\n"
)
NOT_FOUND_HTML = "<!DOCTYPE html>\n<html><head><title>404</title></head><body><h1>Not found</h1></body></html>\n"
