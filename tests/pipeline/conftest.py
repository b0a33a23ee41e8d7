"""Fixtures shared by the fetcher tests: a BadServer per module, and one per test."""

import pytest

from tests.pipeline.badserver import BadServer


@pytest.fixture(scope="module")
def srv():
    with BadServer() as server:
        yield server


@pytest.fixture
def fresh():
    """A server of its own, for robots.txt variants and exact counts."""
    with BadServer() as server:
        yield server
