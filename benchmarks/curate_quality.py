"""How well curation removes the demo site's mismatched alt text: precision and recall against its ground truth.

    python benchmarks/curate_quality.py CURATED_DIR GROUND_TRUTH.jsonl

CURATED_DIR is the output of ``altforge curate`` on a scrape of the demo site; GROUND_TRUTH is what
``altforge demo-site --ground-truth`` (or ``make demo``) wrote. Scraped samples are matched to the site's ``<img>``
rows by (image sha256, alt text). Prints the confusion table and three views:

- the CLIP score filter alone, on the pool it judged (after basic filters and dedup);
- every drop except duplicates (dropping one copy of a correctly captioned duplicate is not an error);
- every drop.
"""

from __future__ import annotations

import json
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.curate.reshard import read_decisions  # noqa: E402


def _pr(dropped: pd.Series, mismatched: pd.Series) -> tuple[float, float]:
    tp = int((dropped & mismatched).sum())
    return tp / max(1, int(dropped.sum())), tp / max(1, int(mismatched.sum()))


def evaluate(curated: str, ground_truth: str) -> dict:
    """Precision and recall of the removal of mismatched pairs, in three views."""
    truth = {}
    with open(ground_truth, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == "content" and r.get("sha256"):
                truth[(r["sha256"], r["alt"])] = r["matches"]
    d = read_decisions(curated)
    d["matches"] = [truth.get((s, c)) for s, c in zip(d["sha256"], d["caption"], strict=True)]
    c = d[d["matches"].notna()].copy()
    mis = c["matches"] == False  # noqa: E712
    drop = c["status"] != "success"
    dup = c["status"].str.contains("duplicate")
    pool = c["status"].isin(["success", "low_clip_score"])
    out = {"samples": len(d), "matched_to_ground_truth": len(c), "mismatched": int(mis.sum())}
    p, r = _pr((c["status"] == "low_clip_score")[pool], mis[pool])
    out["score_filter"] = {"precision": round(p, 4), "recall": round(r, 4), "pool": int(pool.sum())}
    p, _ = _pr(drop & ~dup, mis)
    _, r = _pr(drop, mis)
    out["non_duplicate_drops"] = {"precision": round(p, 4), "recall_all_drops": round(r, 4)}
    p, r = _pr(drop, mis)
    out["all_drops"] = {"precision": round(p, 4), "recall": round(r, 4)}
    print(pd.crosstab(c["status"], c["matches"].map({True: "matches", False: "mismatched"})))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(json.dumps(evaluate(sys.argv[1], sys.argv[2]), indent=1))
