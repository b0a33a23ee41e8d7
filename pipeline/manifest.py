"""Output manifests: what a stage built (shards, counts, checksums, stats), from what, with which code."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from importlib import metadata

from pipeline import shards, storage
from pipeline.stats import StageStats

MANIFEST_VERSION = 1


def code_version() -> str:
    """The git SHA of the checkout this code runs from (``-dirty`` if modified), else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return "altforge-" + metadata.version("altforge")
        except metadata.PackageNotFoundError:
            return "unknown"


def build_manifest(
    dataset_url: str,
    stage: str,
    config: dict,
    recipe: dict | None = None,
    parent: str | None = None,
    storage_options: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Collect the done shards of a dataset into a manifest dict (does not write it)."""
    records = [
        shards.read_shard_stats(dataset_url, n, storage_options)
        for n in shards.done_shards(dataset_url, storage_options)
    ]
    total = sum((StageStats.from_dict(r) for r in records), StageStats())
    return {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "dataset": dataset_url,
        "recipe": storage.redact_secrets(recipe),  # the dataset is shared: its credentials are not
        "config": storage.redact_secrets(config),
        "parent": parent,
        "shards": [
            {
                "name": f"{r['shard']}.tar",
                "samples": r["samples"],
                "rows": r.get("rows"),
                "bytes": r["bytes"],
                "sha256": r["sha256"],
            }
            for r in records
        ],
        "samples": sum(r["samples"] for r in records),
        "stats": total.to_dict(),
        "code_version": code_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_manifest(dataset_url: str, manifest: dict, storage_options: dict | None = None) -> str:
    """Write ``sizes.json`` and ``manifest.json`` beside the shards (the manifest atomically); returns its URL."""
    shards.write_sizes(dataset_url, storage_options, {s["name"]: s["samples"] for s in manifest["shards"]})
    final = storage.join(dataset_url, "manifest.json")
    storage.write_whole(final, json.dumps(manifest, indent=2, default=str).encode(), storage_options)
    return final


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """Read a manifest given its URL or its dataset directory."""
    if not url.endswith(".json"):
        url = storage.join(url, "manifest.json")
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"manifest not found: {url}")
    return json.loads(storage.read_bytes(url, storage_options))
