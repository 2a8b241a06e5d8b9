"""pytest configuration for ``pytest benchmarks/`` (CI runs ``pytest tests/``, which never loads this).

Without pytest-benchmark, ``pytest benchmarks/ --benchmark-only`` would stop at an
unknown option; accept its options here so that the benchmark module can skip itself
with a clear reason instead.
"""
import importlib.util

import pytest


def pytest_addoption(parser, pluginmanager):
    if importlib.util.find_spec("pytest_benchmark") is None and not pluginmanager.hasplugin("benchmark"):
        group = parser.getgroup("benchmark (pytest-benchmark is not installed)")
        group.addoption("--benchmark-only", action="store_true", help="needs pytest-benchmark; ignored here")
        group.addoption("--benchmark-skip", action="store_true", help="needs pytest-benchmark; ignored here")
        group.addoption("--benchmark-autosave", action="store_true", help="needs pytest-benchmark; ignored here")


def pytest_collection_modifyitems(config, items):
    """Installed but disabled (``-p no:benchmark``): skip the tests that need its fixture."""
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="the pytest-benchmark plugin is not active")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
