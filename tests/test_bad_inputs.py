"""Every bad input of the table in badinputs.py gets its clear error or quarantine, never a silent drop."""
from __future__ import annotations

import pytest

from .harness.badinputs import CASES, attempt


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_met_as_specified(ray_local, tmp_path, case):
    result = attempt(case, tmp_path / "root")
    assert result["handled"], result
