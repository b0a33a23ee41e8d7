"""Input plans keep every planned record, whatever the text of its fields."""

from collections import Counter

from pipeline.plan import read_partition, write_partitions
from pipeline.sources.url_list import iter_url_list


def test_lone_surrogates_are_planned_as_replacement_characters(tmp_path):
    # "\ud800" escapes decode to lone surrogates, which UTF-8 (so Arrow) cannot hold.
    (tmp_path / "l.jsonl").write_text(
        '{"url": "http://127.0.0.1:9/a\\ud800.jpg", "caption": "a red \\udc80 box"}\n'
        '{"url": "http://127.0.0.1:9/b.jpg", "caption": "fine caption"}\n'
    )
    records = list(iter_url_list(str(tmp_path / "l.jsonl"), drops=Counter()))
    records.append({"url": "http://127.0.0.1:9/c.jpg", "caption": "from a page", "page_url": "http://x.test/\udfff"})
    parts = write_partitions(records, str(tmp_path / "ds"), shard_size=2)
    assert [p["records"] for p in parts] == [2, 1]
    rows = read_partition(parts[0]["url"]) + read_partition(parts[1]["url"])
    assert [(r["url"], r["alt_raw"], r["page_url"]) for r in rows] == [
        ("http://127.0.0.1:9/a\ufffd.jpg", "a red \ufffd box", None),
        ("http://127.0.0.1:9/b.jpg", "fine caption", None),
        ("http://127.0.0.1:9/c.jpg", None, "http://x.test/\ufffd"),
    ]
    assert rows[0]["caption"] == "a red \ufffd box"
