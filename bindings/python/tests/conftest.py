import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spec_reference, stand-ins

import calibrl  # noqa: E402
from calibrl import _lib  # noqa: E402

REPO = HERE.parent.parent.parent


def _has(symbol: str) -> bool:
    return _lib.has(symbol)


# The loss exports land separately from these bindings; their tests run as soon as the loaded
# library has the symbols (and are reported as skipped, with this reason, until then).
needs_loss = pytest.mark.skipif(
    not (_has("calibrl_loss") and _has("calibrl_group_advantages")),
    reason="the loaded libcalibrl.so does not export calibrl_loss / calibrl_group_advantages yet",
)
needs_cuda = pytest.mark.skipif(
    not (__import__("torch").cuda.is_available()), reason="no CUDA device"
)


def pytest_report_header(config):
    return f"calibrl library: {_lib.lib().path} (version {calibrl.library_version()}); missing symbols: {sorted(_lib.lib().missing) or 'none'}"
