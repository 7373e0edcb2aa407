"""A pytest plugin (`-p tests.nbmake_smoke`): the notebook that `pytest --nbmake spoon_feed.ipynb` executes in a
fresh kernel (nbmake) runs the smoke preset unless SPOONFEED_PRESET says otherwise. scripts/test.sh collects it
with the unit tests in one run, so that it runs on one worker while the other works through tests/. A plugin, not
a conftest.py at the root: the tests' subprocesses import tests/conftest.py as `conftest`."""

import os

_SAVED = "spoonfeed_preset_before"


def pytest_runtest_setup(item):
    """The kernel nbmake starts inherits this process's environment: SPOONFEED_PRESET=smoke for the notebook's
    item alone, put back after it, so that no test that runs after it on this worker sees it."""
    if item.path.suffix == ".ipynb":
        setattr(item, _SAVED, os.environ.get("SPOONFEED_PRESET"))
        os.environ.setdefault("SPOONFEED_PRESET", "smoke")


def pytest_runtest_teardown(item):
    if item.path.suffix == ".ipynb" and hasattr(item, _SAVED):
        before = getattr(item, _SAVED)
        if before is None:
            os.environ.pop("SPOONFEED_PRESET", None)
        else:
            os.environ["SPOONFEED_PRESET"] = before
