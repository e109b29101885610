"""Shared fixtures. Expensive ones are session-scoped so the suite stays within CI's time budget."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_KINDS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test says what kind it is (pyproject.toml's markers), so `pytest -m unit` is a fast, honest subset."""
    for item in items:
        kinds = {mark.name for mark in item.iter_markers() if mark.name in TEST_KINDS}
        if len(kinds) != 1:
            raise pytest.UsageError(
                f"{item.nodeid}: mark the test with exactly one of {', '.join(TEST_KINDS)} (has {sorted(kinds)})"
            )


@pytest.fixture(scope="session")
def deviation_bundle(tmp_path_factory):
    from tests.bundles import make_deviation_bundle

    return make_deviation_bundle(tmp_path_factory.mktemp("deviation_bundle"), 64, 64)


@pytest.fixture
def calibrated(deviation_bundle, tmp_path):
    """A copy of the deviation bundle calibrated at pixel threshold 0.5: what the daemon tests run on."""
    import shutil

    from tests.test_daemon import write_calibration

    dst = tmp_path / "bundle"
    shutil.copytree(deviation_bundle, dst)
    write_calibration(dst, 0.5)
    return dst
