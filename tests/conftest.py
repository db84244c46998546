"""The test tree mirrors the packages (tests/server/aggregation/ tests server/aggregation/, ...);
the helpers several rooms share (fake sites and transports, synthetic site folders, report run
folders, the small simulation cohort) live in tests/support/, which this puts on ``sys.path`` so a
test imports them by name (``from server_fakes import config``) wherever it sits."""

import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))
