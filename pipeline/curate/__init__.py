"""The curation stage: CLIP pair scores, basic filters, dedup, zero-shot tags, even reshards and a review report.

Two passes, the DataComp way: ``scores.score_shard`` runs the model once per source shard and stores embeddings
and scores; ``select.select`` decides every sample over the whole dataset (global percentile, cross-shard dedup);
``reshard.curate_shard`` writes the kept samples into new even shards. ``stage.curate_dataset`` runs it all in one
process; ``flows/curate.py`` runs the same functions as Prefect tasks.
"""

from pipeline.curate.reshard import curate_shard
from pipeline.curate.scorer import ClipScorer, load_scorer
from pipeline.curate.scores import score_shard
from pipeline.curate.select import DEFAULT_KEEP_FRACTION, Selection, select
from pipeline.curate.stage import curate_dataset

__all__ = [
    "DEFAULT_KEEP_FRACTION",
    "ClipScorer",
    "Selection",
    "curate_dataset",
    "curate_shard",
    "load_scorer",
    "score_shard",
    "select",
]
