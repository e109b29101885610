"""Shared fixtures. Expensive ones are session-scoped so the suite stays within CI's time budget."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def deviation_bundle(tmp_path_factory):
    from tests.bundles import make_deviation_bundle

    return make_deviation_bundle(tmp_path_factory.mktemp("deviation_bundle"), 64, 64)
