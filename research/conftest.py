"""The research scripts' tests reuse the product suite's tiny networks (tests/conftest.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import _pinned_threads, tiny_checkpoint, tiny_net  # noqa: E402,F401
