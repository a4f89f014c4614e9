"""Test-session set-up shared by tests/ and the nbval notebook runs.

Every run folder of the session (including the smoke run the notebooks execute under nbval)
goes to one temporary folder, so tests never touch ``runs/`` in the checkout.
"""

import os
import tempfile

from cxrlib.config import RUNS_DIR_ENV


def pytest_configure(config):
    if not os.environ.get(RUNS_DIR_ENV):
        os.environ[RUNS_DIR_ENV] = tempfile.mkdtemp(prefix="cxrlib-test-runs-")
