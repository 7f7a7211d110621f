"""Shared pytest set-up: Triton's interpreter on CPU, GPU-test skipping, a scratch run folder, and the
test folder on ``sys.path`` so the rank workers under ``tests/workers`` import as ``workers.*``."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Spawned ranks unpickle their worker by module path (``workers.cp.matrix_worker``): the fork server
# that starts them copies this process's sys.path, so the test folder must be on it whatever pytest's
# import mode (PYTHONSAFEPATH=1 keeps the working directory off it).
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Must happen before anything imports triton: without CUDA, kernels run in Triton's interpreter.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001 - a broken torch install fails loudly in the tests themselves
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU machines)")
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tmp_run_dir(tmp_path_factory: pytest.TempPathFactory):
    """An empty run folder (removed after the test) with ``LONGREACH_CACHE`` pointed inside it."""
    path = tmp_path_factory.mktemp("run")
    old = os.environ.get("LONGREACH_CACHE")
    os.environ["LONGREACH_CACHE"] = str(path / "cache")
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("LONGREACH_CACHE", None)
        else:
            os.environ["LONGREACH_CACHE"] = old
        shutil.rmtree(path, ignore_errors=True)
