"""robots.txt rules and the X-Robots-Tag AI opt-out, parsed leniently the way Google documents them.

Our own parser (not ``urllib.robotparser``, which applies the first matching rule and knows no wildcards):

- Groups start with one or more ``User-agent`` lines; rules before any group are ignored. The groups whose
  agent equals our product token (case-insensitive, any ``/version`` dropped) are merged and used; failing that
  the ``*`` groups; failing that everything is allowed.
- ``Allow`` / ``Disallow`` patterns match from the start of the URL path plus query, with ``*`` (any run of
  characters) and a trailing ``$`` (end of URL). The longest matching pattern wins; on a tie ``Allow`` wins.
  An empty pattern is no rule. Other fields (sitemap, crawl-delay, ...) and malformed lines are ignored.
- Bytes are decoded as UTF-8 with replacement (a BOM is dropped), so a non-UTF-8 file still parses.
- ``/robots.txt`` itself is always allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote

AGENT_TOKEN = "altforge"  # the product token we look for in robots.txt and X-Robots-Tag
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
ROBOTS_MAX_BYTES = 500_000  # bytes; Google reads the first 500 KiB and ignores the rest

# X-Robots-Tag directives that carry a value after a colon (so the colon does not name a user agent).
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_FIELD_ALIASES = {
    "user-agent": "user-agent",
    "useragent": "user-agent",
    "user agent": "user-agent",
    "allow": "allow",
    "disallow": "disallow",
    "dissallow": "disallow",
    "disalow": "disallow",
}
_PERCENT = re.compile(r"%[0-9a-fA-F]{2}")


def _normalize(path: str) -> str:
    """Percent-encode non-ASCII and upper-case existing escapes, so patterns and URLs compare alike."""
    path = quote(path, safe="".join(chr(c) for c in range(0x21, 0x7F)))
    return _PERCENT.sub(lambda m: m.group(0).upper(), path)


@dataclass(frozen=True)
class RobotsRule:
    """One Allow/Disallow line: the pattern as written (normalized) and its compiled matcher."""

    allow: bool
    pattern: str
    parts: tuple[str, ...]  # the literal pieces between the pattern's ``*``s
    anchored: bool  # the pattern ended in ``$``: the path must end where the pattern does

    @classmethod
    def make(cls, allow: bool, pattern: str) -> RobotsRule:
        """Parse ``pattern`` (``*`` wildcard, trailing ``$`` anchor) into a rule."""
        pattern = _normalize(pattern if pattern.startswith(("/", "*")) else "/" + pattern)
        anchored = pattern.endswith("$")
        body = pattern[:-1] if anchored else pattern
        return cls(allow, pattern, tuple(body.split("*")), anchored)

    def matches(self, path: str) -> bool:
        """Whether ``path`` matches, in linear time: each literal piece is found left to right (the leftmost match
        leaves the most room for the rest), so a hostile ``/*a*a*a*...*b`` costs no backtracking."""
        first, *rest = self.parts
        if not path.startswith(first):
            return False
        pos = len(first)
        if not rest:
            return pos == len(path) if self.anchored else True
        *middle, last = rest
        for piece in middle:
            found = path.find(piece, pos)
            if found < 0:
                return False
            pos = found + len(piece)
        if self.anchored:
            return path.endswith(last) and len(path) - len(last) >= pos
        return path.find(last, pos) >= 0


@dataclass(frozen=True)
class RobotsRules:
    """The rules of one robots.txt that apply to our agent; ``default`` answers when no rule matches."""

    rules: tuple[RobotsRule, ...] = ()
    default: bool = True  # False only for "disallow all" (robots.txt unreachable or 5xx)

    def allowed(self, path: str) -> bool:
        """True if ``path`` (URL path plus ``?query``, percent-encoded as in the URL) may be fetched."""
        path = path or "/"
        if path == "/robots.txt":
            return True
        if not self.rules:
            return self.default
        path = _normalize(path)
        best: RobotsRule | None = None
        for rule in self.rules:
            if not rule.matches(path):
                continue
            longer = best is None or len(rule.pattern) > len(best.pattern)
            if longer or (len(rule.pattern) == len(best.pattern) and rule.allow):
                best = rule
        return self.default if best is None else best.allow


ALLOW_ALL = RobotsRules()
DISALLOW_ALL = RobotsRules(default=False)


def _agent_name(value: str) -> str:
    """``"Altforge/1.0 (+info)"`` -> ``"altforge"``."""
    value = value.strip().lower()
    return value.split("/", 1)[0].split(None, 1)[0] if value else ""


def parse_robots(data: bytes | str, agent: str = AGENT_TOKEN) -> RobotsRules:
    """Parse robots.txt text (bytes decoded leniently) into the rules that apply to ``agent``."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.lstrip("\ufeff")
    agent = agent.lower()
    groups: list[tuple[set[str], list[RobotsRule]]] = []
    in_agents = False  # True while reading the User-agent lines that open a group
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        field = _FIELD_ALIASES.get(key.lower())
        if field == "user-agent":
            if not in_agents:
                groups.append((set(), []))
                in_agents = True
            groups[-1][0].add(_agent_name(value))
        elif field in ("allow", "disallow"):
            in_agents = False
            if groups and value:
                groups[-1][1].append(RobotsRule.make(field == "allow", value))
    for wanted in (agent, "*"):
        rules = [rule for names, group in groups if wanted in names for rule in group]
        if any(wanted in names for names, _ in groups):
            return RobotsRules(tuple(rules))
    return ALLOW_ALL


_PRODUCT_TOKEN = re.compile(r"[a-z0-9_.-]+")  # a user-agent scope: one token, unlike a date's "25 jun 2030 15"


def header_says(header_values: Iterable[str], directives: frozenset[str], agent: str = AGENT_TOKEN) -> bool:
    """True if any X-Robots-Tag value holds one of ``directives`` for everyone or for ``agent``.

    Each header value is a comma-separated directive list, optionally opened by ``<useragent>:`` which scopes
    the directives after it (``"altforge: noai"``, ``"otherbot: noindex, noai"``). Case-insensitive.
    """
    agent = agent.lower()
    for value in header_values:
        scope: str | None = None  # None: applies to every agent
        for item in value.split(","):
            item = item.strip().lower()
            if ":" in item:
                head, rest = (part.strip() for part in item.split(":", 1))
                if head in _VALUED_DIRECTIVES:
                    pass
                elif _PRODUCT_TOKEN.fullmatch(head):
                    scope, item = _agent_name(head), rest
                else:  # the rest of a value cut at its comma ("unavailable_after: Fri, 25 Jun 2030 15:00:00 GMT")
                    continue
            if item in directives and scope in (None, agent):
                return True
    return False


def opt_out(header_values: Iterable[str], agent: str = AGENT_TOKEN) -> bool:
    """True if any X-Robots-Tag value says noai / noimageai for everyone or for ``agent``."""
    return header_says(header_values, OPT_OUT_DIRECTIVES, agent)
