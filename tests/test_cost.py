"""cost.measured: each block reports its own peak memory, and an outer block the larger of its own and its inner
blocks' (the inner block's reset must not hide the outer's peak)."""

import numpy as np
import pytest

from preftune.cost import CLEAR_REFS, measured

pytestmark = pytest.mark.skipif(not CLEAR_REFS.exists(), reason="needs Linux's /proc/self/clear_refs")


def _touch(mb: int) -> None:
    block = np.ones(mb * 125_000)  # 8 bytes each: mb MB resident while it lives
    assert block.sum() == mb * 125_000


def test_each_block_reports_its_own_peak_and_the_outer_the_largest():
    outer, big, small = {}, {}, {}
    with measured(outer):
        with measured(big):
            _touch(400)
        with measured(small):
            _touch(20)
    assert not outer["peak_since_start"]
    assert small["peak_rss_mb"] < big["peak_rss_mb"] - 300  # the reset hid the earlier 400 MB
    assert outer["peak_rss_mb"] >= big["peak_rss_mb"]  # the inner resets did not hide it from the outer
    assert outer["wall_s"] >= big["wall_s"] + small["wall_s"] - 0.2
