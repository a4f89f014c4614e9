"""Test-session set-up shared by tests/ and the nbval notebook runs.

Every run folder of the session (including the smoke run the notebooks execute under nbval)
goes to one temporary folder, so tests never touch ``runs/`` in the checkout.
"""

import os
import tempfile

import pytest
import torch

from cxrlib.core.layout import RUNS_DIR_ENV


def pytest_configure(config):
    if not os.environ.get(RUNS_DIR_ENV):
        os.environ[RUNS_DIR_ENV] = tempfile.mkdtemp(prefix="cxrlib-test-runs-")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: on a busy 2-core machine more threads make tiny ops
    ~100x slower (OpenMP threads spin while waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
