"""Fixtures the end-to-end tests share."""

from tests.integration.fleet_fixtures import fleet

__all__ = ["fleet"]
