"""Inputs of the scrape stage: web crawls, WARC/WAT archives and URL lists, each yielding image records."""

from pipeline.sources.crawl import CrawlConfig, crawl
from pipeline.sources.html import ExtractConfig, extract_images, extract_links, extract_page, page_opts_out
from pipeline.sources.records import Record, SeenPairs, partition, record_key
from pipeline.sources.url_list import iter_hf_dataset, iter_url_list
from pipeline.sources.warc import iter_warc

__all__ = [
    "CrawlConfig",
    "ExtractConfig",
    "Record",
    "SeenPairs",
    "crawl",
    "extract_images",
    "extract_links",
    "extract_page",
    "iter_hf_dataset",
    "iter_url_list",
    "iter_warc",
    "page_opts_out",
    "partition",
    "record_key",
]
