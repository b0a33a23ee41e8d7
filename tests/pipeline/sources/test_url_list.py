"""URL lists in every img2dataset format (plain and gzipped), streaming, and Hugging Face datasets from disk."""

import csv
import gzip
import json
import tracemalloc
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sources.records import Record
from pipeline.sources.url_list import infer_format, iter_hf_dataset, iter_url_list, partition

ROWS = [
    {"url": "https://img.example/1.jpg", "caption": "A red bicycle", "width": 640},
    {"url": "  https://img.example/2.jpg ", "caption": "", "width": 800},  # empty caption -> None, url stripped
    {"url": "", "caption": "no url here", "width": 1},  # bad_url
    {"url": "ftp://img.example/3.jpg", "caption": "wrong scheme", "width": 2},  # bad_url
    {"url": "https://img.example/4.jpg", "caption": "Caf\u00c3\u00a9  au\tlait", "width": 1024},  # mojibake fixed
]
EXPECTED = [
    ("https://img.example/1.jpg", "A red bicycle"),
    ("https://img.example/2.jpg", None),
    ("https://img.example/4.jpg", "Café au lait"),
]


def _open(path, mode="wt"):
    return (
        gzip.open(path, mode, encoding="utf-8", newline="")
        if str(path).endswith(".gz")
        else open(path, mode, newline="")
    )


def _write(path, fmt: str, rows=ROWS, url_col="url", caption_col="caption"):
    renamed = [{url_col: r["url"], caption_col: r["caption"], "width": r["width"]} for r in rows]
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(renamed), path)
    elif fmt in ("csv", "tsv"):
        with _open(path) as fh:
            w = csv.DictWriter(fh, fieldnames=[url_col, caption_col, "width"], delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(renamed)
    elif fmt == "jsonl":
        with _open(path) as fh:
            fh.writelines(json.dumps(r) + "\n" for r in renamed)
    elif fmt == "json":
        with _open(path) as fh:
            json.dump(renamed, fh, indent=1)
    elif fmt == "txt":
        with _open(path) as fh:
            fh.writelines(r["url"] + "\n" for r in rows)


def _pairs(recs):
    return [(r.url, r.caption) for r in recs]


@pytest.mark.parametrize("name", ["csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz", "json", "json.gz", "parquet"])
def test_every_format_plain_and_gzipped(tmp_path, name):
    fmt = name.removesuffix(".gz")
    path = tmp_path / f"list.{name}"
    _write(path, fmt)
    drops = Counter()
    recs = list(iter_url_list(str(path), extra_cols=("width",), drops=drops))
    assert _pairs(recs) == EXPECTED
    assert drops == Counter({"bad_url": 2})
    widths = [dict(r.extra)["width"] for r in recs]
    assert widths == (["640", "800", "1024"] if fmt in ("csv", "tsv") else [640, 800, 1024])
    assert recs[2].alt_raw == "Caf\u00c3\u00a9  au\tlait" and recs[0].page_url is None


@pytest.mark.parametrize("gz", [False, True])
def test_txt_list_has_no_captions(tmp_path, gz):
    path = tmp_path / ("urls.txt" + (".gz" if gz else ""))
    _write(path, "txt")
    drops = Counter()
    recs = list(iter_url_list(str(path), drops=drops))
    assert _pairs(recs) == [(u, None) for u, _ in EXPECTED]
    assert drops == Counter({"bad_url": 2})


def test_img2dataset_style_parquet_and_tsv_with_custom_columns(tmp_path):
    pq.write_table(
        pa.table(
            {
                "URL": ["https://i.example/a.png", None],
                "TEXT": ["a laion style row", "null url"],
                "NSFW": ["UNLIKELY", "x"],
            }
        ),
        tmp_path / "laion.parquet",
    )
    drops = Counter()
    recs = list(
        iter_url_list(
            str(tmp_path / "laion.parquet"), url_col="URL", caption_col="TEXT", extra_cols=["NSFW"], drops=drops
        )
    )
    assert recs == [
        Record(
            "https://i.example/a.png", "a laion style row", alt_raw="a laion style row", extra=(("NSFW", "UNLIKELY"),)
        )
    ]
    assert drops == Counter({"bad_url": 1})

    _write(tmp_path / "cc.tsv.gz", "tsv", url_col="image_url", caption_col="alt")
    recs = list(
        iter_url_list(
            str(tmp_path / "cc.tsv.gz"), input_format="tsv.gz", url_col="image_url", caption_col="alt", drops=Counter()
        )
    )
    assert _pairs(recs) == EXPECTED
    # caption_col=None reads no caption even where the file has one
    recs = list(iter_url_list(str(tmp_path / "cc.tsv.gz"), url_col="image_url", caption_col=None, drops=Counter()))
    assert [r.caption for r in recs] == [None, None, None]


def test_directory_of_files_in_name_order(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "b.parquet", "parquet", rows=ROWS[4:])
    _write(tmp_path / "d" / "a.parquet", "parquet", rows=ROWS[:2])
    (tmp_path / "d" / "notes.txt").write_text("https://ignored.example/x.jpg\n")
    recs = list(iter_url_list(str(tmp_path / "d"), input_format="parquet", drops=Counter()))
    assert _pairs(recs) == EXPECTED


def test_pandas_column_layout_json(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "cols.json"
    pd.DataFrame(ROWS).to_json(path)  # pandas' default layout: {"url": {"0": ...}, ...}
    assert json.loads(path.read_text())["url"]["0"] == ROWS[0]["url"]
    drops = Counter()
    assert _pairs(iter_url_list(str(path), drops=drops)) == EXPECTED
    assert drops == Counter({"bad_url": 2})


def test_bad_rows_and_missing_columns(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        '{"url": "https://a.example/1.jpg"}',
        "not json at all",
        "[1, 2]",
        "",
        '{"url": "https://a.example/2.jpg", "caption": 7}',
    ]
    path.write_text("\n".join(lines) + "\n")
    drops = Counter()
    recs = list(iter_url_list(str(path), drops=drops))
    assert [(r.url, r.caption) for r in recs] == [("https://a.example/1.jpg", None), ("https://a.example/2.jpg", "7")]
    assert drops == Counter({"bad_row": 2})
    _write(tmp_path / "l.csv", "csv")
    with pytest.raises(ValueError, match="TEXT"):
        next(iter_url_list(str(tmp_path / "l.csv"), caption_col="TEXT", drops=Counter()))
    with pytest.raises(ValueError, match="input format"):
        infer_format("list.xlsx")
    with pytest.raises(ValueError, match="input_format"):
        next(iter_url_list(str(tmp_path / "l.csv"), input_format="xml", drops=Counter()))


def test_infer_format():
    assert infer_format("s3://b/x/part-0.tsv.gz") == "tsv.gz"
    assert infer_format("list.PARQUET") == "parquet"
    assert infer_format("a.ndjson") == "jsonl"


def test_gzipped_csv_is_streamed_in_small_memory(tmp_path):
    n = 200_000
    path = tmp_path / "big.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["url", "caption"])
        w.writerows((f"https://img.example/{i}.jpg", f"caption number {i} of a long list") for i in range(n))
    drops = Counter()
    tracemalloc.start()
    count, last = 0, None
    for rec in iter_url_list(str(path), drops=drops):
        count, last = count + 1, rec
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n and last.url == f"https://img.example/{n - 1}.jpg" and not drops
    # 200k records held at once would take > 60 MB; streaming keeps the peak to buffers.
    assert peak < 8_000_000, f"peak traced memory {peak} bytes"


def test_partition_of_a_stream(tmp_path):
    _write(tmp_path / "l.jsonl", "jsonl")
    parts = list(partition(iter_url_list(str(tmp_path / "l.jsonl"), drops=Counter()), 2))
    assert [[r.url for r in p] for p in parts] == [[EXPECTED[0][0], EXPECTED[1][0]], [EXPECTED[2][0]]]


def test_hf_dataset_from_local_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    drops = Counter()
    recs = list(iter_hf_dataset(str(tmp_path / "pq"), extra_cols=["width"], drops=drops))
    assert _pairs(recs) == EXPECTED
    assert [dict(r.extra)["width"] for r in recs] == [640, 800, 1024]
    assert drops == Counter({"bad_url": 2})

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert _pairs(iter_hf_dataset(str(tmp_path / "saved"), split="test", drops=Counter())) == EXPECTED[:1]
    with pytest.raises(ValueError, match="nope"):
        next(iter_hf_dataset(str(tmp_path / "pq"), caption_col="nope", drops=Counter()))


def test_json_array_is_decoded_across_chunk_boundaries(tmp_path, monkeypatch):
    from pipeline.sources import url_list

    monkeypatch.setattr(url_list, "JSON_CHUNK_CHARS", 7)  # every value spans several reads
    _write(tmp_path / "l.json", "json")
    drops = Counter()
    assert _pairs(iter_url_list(str(tmp_path / "l.json"), drops=drops)) == EXPECTED
    assert drops == Counter({"bad_url": 2})
    text = (tmp_path / "l.json").read_text()
    (tmp_path / "cut.json").write_text(text[: text.index("https://img.example/4.jpg")])  # cut inside the last row
    drops = Counter()
    assert _pairs(iter_url_list(str(tmp_path / "cut.json"), drops=drops)) == EXPECTED[:2]
    assert drops == Counter({"bad_url": 2, "bad_row": 1})


def test_json_nested_too_deeply_is_a_bad_row(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000  # past the interpreter's recursion limit: RecursionError, not ValueError
    ok = [json.dumps({"url": f"https://a.example/{i}.jpg", "caption": f"row {i}"}) for i in (1, 2)]
    (tmp_path / "deep.jsonl").write_text("\n".join([ok[0], deep, ok[1]]) + "\n")
    drops = Counter()
    assert [r.url for r in iter_url_list(str(tmp_path / "deep.jsonl"), drops=drops)] == [
        "https://a.example/1.jpg",
        "https://a.example/2.jpg",
    ]
    assert drops == Counter({"bad_row": 1})
    (tmp_path / "deep.json").write_text(f"[{ok[0]}, {deep}, {ok[1]}]")
    drops = Counter()
    assert [r.url for r in iter_url_list(str(tmp_path / "deep.json"), drops=drops)] == ["https://a.example/1.jpg"]
    assert drops == Counter({"bad_row": 1})  # as a malformed value: nothing after it can be found reliably


@pytest.mark.parametrize("name", ["q.tsv", "q.tsv.gz"])
def test_tsv_line_is_one_row_whatever_its_quotes(tmp_path, name):
    lines = [
        "url\tcaption\twidth",
        'https://a.example/1.jpg\t"Best dog ever\t1',  # an unmatched quote: literal, not a field over 3 lines
        "https://a.example/2.jpg\tA cat\t2",
        'https://a.example/3.jpg\tHe said "hi"\t3',
        'https://a.example/4.jpg\t"Best" cat\t4',
        'https://a.example/5.jpg\t"""Quoted"" by pandas, with\ta tab"\t5',  # csv.writer / to_csv quoting
    ]
    with _open(tmp_path / name) as fh:
        fh.write("\n".join(lines) + "\n")
    drops = Counter()
    recs = list(iter_url_list(str(tmp_path / name), extra_cols=("width",), drops=drops))
    assert [(r.caption, r.extra) for r in recs] == [
        ('"Best dog ever', (("width", "1"),)),
        ("A cat", (("width", "2"),)),
        ('He said "hi"', (("width", "3"),)),
        ('"Best" cat', (("width", "4"),)),
        ('"Quoted" by pandas, with a tab', (("width", "5"),)),
    ]
    assert drops == Counter()


def test_csv_keeps_quoted_fields_over_lines(tmp_path):
    (tmp_path / "q.csv").write_text('url,caption\nhttps://a.example/1.jpg,"two\nlines, one caption"\n')
    recs = list(iter_url_list(str(tmp_path / "q.csv"), drops=Counter()))
    assert [r.alt_raw for r in recs] == ["two\nlines, one caption"]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_lists_check_their_columns_like_a_header(tmp_path, fmt):
    rows = [{"URL": f"https://img.example/{i}.jpg", "TEXT": f"caption {i}"} for i in range(3)]
    path = tmp_path / f"l.{fmt}"
    path.write_text(json.dumps(rows) if fmt == "json" else "\n".join(map(json.dumps, rows)))
    with pytest.raises(ValueError, match=r"column\(s\) \['url'\] not found \(columns: \['TEXT', 'URL'\]\)"):
        next(iter_url_list(str(path), drops=Counter()))  # was: every row a bad_url, and exit 0
    with pytest.raises(ValueError, match=r"column\(s\) \['caption'\] not found"):  # was: every caption None
        next(iter_url_list(str(path), url_col="URL", drops=Counter()))
    got = [(r.url, r.caption) for r in iter_url_list(str(path), url_col="URL", caption_col="TEXT", drops=Counter())]
    assert got == [(f"https://img.example/{i}.jpg", f"caption {i}") for i in range(3)]
    columns = tmp_path / "cols.json"  # pandas' column layout
    columns.write_text(json.dumps({"URL": {"0": "https://img.example/0.jpg"}, "TEXT": {"0": "x"}}))
    with pytest.raises(ValueError, match=r"column\(s\) \['caption'\] not found"):
        next(iter_url_list(str(columns), url_col="URL", drops=Counter()))


def test_a_malformed_json_array_element_costs_its_row_only_in_bounded_memory(tmp_path):
    n = 60_000
    good = [json.dumps({"url": f"https://img.example/{i}.jpg", "caption": f"caption {i}"}) for i in range(n)]
    bad = '{"url": "https://img.example/bad.jpg", "caption": "broken" oops}'
    path = tmp_path / "l.json"
    path.write_text("[" + ",".join([good[0], bad, *good[1:], bad, '{"url": 5 oops']) + "]")
    drops = Counter()
    tracemalloc.start()
    urls = [r.url for r in iter_url_list(str(path), drops=drops)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert urls == [f"https://img.example/{i}.jpg" for i in range(n)] and drops == Counter({"bad_row": 3})
    assert peak < 12_000_000, f"peak traced memory {peak} bytes"  # the file is ~5 MB; the rows alone take more


def test_a_list_in_windows_1252_keeps_its_accents(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes("url,caption\nhttps://img.example/1.jpg,Café crème à Noël\n".encode("cp1252"))
    path2 = tmp_path / "mixed.txt"
    path2.write_bytes(b"https://img.example/caf\xe9.jpg\nhttps://img.example/\xc3\xa9t\xc3\xa9.jpg\n")
    assert [r.caption for r in iter_url_list(str(path), drops=Counter())] == ["Café crème à Noël"]
    assert [r.url for r in iter_url_list(str(path2), drops=Counter())] == [
        "https://img.example/café.jpg",
        "https://img.example/été.jpg",  # UTF-8 lines stay UTF-8
    ]


def test_a_cut_gzipped_list_keeps_its_rows_and_a_mislabelled_one_is_one_line(tmp_path):
    rows = "\n".join(json.dumps({"url": f"https://img.example/{i}.jpg", "caption": f"c {i}"}) for i in range(5000))
    data = gzip.compress(rows.encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    drops = Counter()
    recs = list(iter_url_list(str(tmp_path / "cut.jsonl.gz"), drops=drops))
    assert 0 < len(recs) < 5000 and drops == Counter({"truncated_list": 1})
    assert [r.url for r in recs] == [f"https://img.example/{i}.jpg" for i in range(len(recs))]
    (tmp_path / "plain.jsonl.gz").write_text(rows)
    with pytest.raises(ValueError, match=r"plain.jsonl.gz: Not a gzipped file .*input_format 'jsonl.gz'"):
        list(iter_url_list(str(tmp_path / "plain.jsonl.gz"), drops=Counter()))
