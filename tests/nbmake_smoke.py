"""A pytest plugin (`-p tests.nbmake_smoke`): the notebook that `pytest --nbmake spoon_feed.ipynb` executes in a
fresh kernel (nbmake) runs the smoke preset, whatever SPOONFEED_PRESET the shell holds, as the test command ran it
before (`SPOONFEED_PRESET=smoke pytest --nbmake`). scripts/test.sh collects it with the unit tests in one run, so
that it runs on one worker while the other works through tests/. A plugin, not a conftest.py at the root: the
tests' subprocesses import tests/conftest.py as `conftest`."""

import pytest

_PATCH = pytest.StashKey[pytest.MonkeyPatch]()


def pytest_runtest_setup(item):
    """The kernel nbmake starts inherits this process's environment: SPOONFEED_PRESET=smoke for the notebook's
    item alone, put back as it was after it (pass or fail), so that no test after it on this worker sees it."""
    if item.path.suffix == ".ipynb":
        patch = item.stash[_PATCH] = pytest.MonkeyPatch()
        patch.setenv("SPOONFEED_PRESET", "smoke")


def pytest_runtest_teardown(item):
    if _PATCH in item.stash:
        item.stash[_PATCH].undo()
