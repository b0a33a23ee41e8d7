"""robots.txt parsing and matching, and the X-Robots-Tag opt-out: pure functions."""

import pytest

from pipeline.robots import ALLOW_ALL, DISALLOW_ALL, opt_out, parse_robots


def test_longest_match_wins_and_allow_wins_ties():
    rules = parse_robots("User-agent: *\nDisallow: /private\nAllow: /private/ok\nDisallow: /same\nAllow: /same\n")
    assert not rules.allowed("/private")
    assert not rules.allowed("/private/x.png")
    assert not rules.allowed("/privateer")  # prefix match, as Google does
    assert rules.allowed("/private/ok.png")
    assert rules.allowed("/same/x")
    assert rules.allowed("/public")


def test_wildcards_and_end_anchor():
    rules = parse_robots("User-agent: *\nDisallow: /*.gif$\nDisallow: /img/*/raw\nAllow: /img/*/raw/ok\n")
    assert not rules.allowed("/a/b.gif")
    assert rules.allowed("/a/b.gif?x=1")  # $ anchors the end of path+query
    assert rules.allowed("/a/b.gifs")
    assert not rules.allowed("/img/12/raw/1.jpg")
    assert rules.allowed("/img/12/raw/ok/1.jpg")
    assert rules.allowed("/img/raw")


def test_query_is_part_of_the_match():
    rules = parse_robots("User-agent: *\nDisallow: /*?session=\n")
    assert not rules.allowed("/a.jpg?session=1")
    assert rules.allowed("/a.jpg?size=1")


def test_our_group_beats_star_and_groups_merge():
    text = (
        "User-agent: *\nDisallow: /\n\n"
        "User-agent: AltForge/2.1\nDisallow: /a\n\n"
        "User-agent: otherbot\nUser-agent: altforge\nDisallow: /b\n"
    )
    rules = parse_robots(text)
    assert not rules.allowed("/a/1") and not rules.allowed("/b/1")
    assert rules.allowed("/c/1")  # the * group's "Disallow: /" does not apply to us
    assert not parse_robots(text, agent="somebot").allowed("/c/1")


def test_no_matching_group_or_empty_disallow_allows_all():
    assert parse_robots("User-agent: otherbot\nDisallow: /\n").allowed("/x")
    assert parse_robots("User-agent: *\nDisallow:\n").allowed("/x")
    assert parse_robots("").allowed("/x")


def test_malformed_and_non_utf8_lines_ignored():
    data = (
        b"\xef\xbb\xbfgarbage line\nDisallow: /before-group\nUser-agent: *\nDisallow /no-colon\n: no key\n"
        b"\xff\xfe\x80 junk\nDisallow: /private # comment\nSitemap: http://x/s.xml\nDisallow: caf\xe9\n"
    )
    rules = parse_robots(data)
    assert not rules.allowed("/private/1")
    assert rules.allowed("/before-group") and rules.allowed("/no-colon")
    assert not rules.allowed("/caf%EF%BF%BD")  # the undecodable byte became U+FFFD, pattern got a leading /


def test_percent_encoding_normalized():
    rules = parse_robots("User-agent: *\nDisallow: /caf\u00e9\nDisallow: /a%2fb\n")
    assert not rules.allowed("/caf%C3%A9/menu")
    assert not rules.allowed("/caf%c3%a9")
    assert not rules.allowed("/a%2Fb")


def test_robots_txt_itself_and_constants():
    assert DISALLOW_ALL.allowed("/robots.txt") and not DISALLOW_ALL.allowed("/")
    assert ALLOW_ALL.allowed("/anything") and parse_robots("User-agent: *\nDisallow: /\n").allowed("/robots.txt")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], True),
        (["NoImageAI"], True),
        (["noindex, noai"], True),
        (["altforge: noai"], True),
        (["AltForge: noimageai, nofollow"], True),
        (["otherbot: noai"], False),
        (["otherbot: noindex, noai"], False),  # the agent prefix scopes the whole value
        (["googlebot: noindex", "noimageai"], True),
        (["unavailable_after: 25 Jun 2030 15:00:00 PST, noai"], True),  # a valued directive is not an agent
        (["unavailable_after: Fri, 25 Jun 2030 15:00:00 GMT, noai"], True),  # RFC 822's comma: not "25" as an agent
        (["otherbot: unavailable_after: Fri, 25 Jun 2030 15:00:00 GMT, noai"], False),  # the scope holds across it
        (["max-image-preview: large"], False),
        (["noindex, nofollow"], False),
        (["none"], False),
        ([], False),
    ],
)
def test_x_robots_tag_opt_out(values, expected):
    assert opt_out(values) is expected


def test_wildcard_matching_is_linear_and_agrees_with_a_regex():
    import random
    import re
    import time

    hostile = parse_robots("User-agent: *\nDisallow: /*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b\n")
    start = time.perf_counter()
    assert hostile.allowed("/" + "a" * 5000)  # no b: allowed, and no backtracking blow-up
    assert time.perf_counter() - start < 0.5
    assert not hostile.allowed("/" + "a" * 40 + "b")
    rng = random.Random(0)
    for _ in range(3000):  # the matcher against the straightforward regex translation, on random short strings
        pattern = "/" + "".join(rng.choice("ab*") for _ in range(rng.randrange(6))) + rng.choice(["", "$"])
        path = "/" + "".join(rng.choice("ab") for _ in range(rng.randrange(8)))
        body, anchored = (pattern[:-1], True) if pattern.endswith("$") else (pattern, False)
        regex = ".*".join(re.escape(p) for p in body.split("*")) + ("$" if anchored else "")
        rules = parse_robots(f"User-agent: *\nDisallow: {pattern}\n")
        assert rules.allowed(path) == (re.match(regex, path) is None), (pattern, path)
