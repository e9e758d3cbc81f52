"""A short soak (the full one is `make soak`): many concurrent clients, workers killed and
stopped at random while they serve; nothing lost or corrupted, router memory flat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "faultlab"))
import soak  # noqa: E402


@pytest.mark.timeout(180)
async def test_a_short_soak_with_random_worker_restarts(tmp_path, capsys):
    result = await soak.soak(clients=200, seconds=25, workers=3, restart_every=4,
                             log_path=tmp_path / "soak.log")
    with capsys.disabled():
        print("\n" + "\n".join(soak.summary(result, 200, 25)))
    counts = result["counts"]
    assert counts["sent"] > 500
    assert counts["lost"] == 0 and counts["corrupted"] == 0
    assert counts["completed"] + counts["failed"] == counts["sent"]
    assert counts["failed"] <= counts["sent"] * 0.01
    assert sum(v for k, v in counts.items() if k.startswith("restarts_")) >= 4
    memory = [m for _, m in result["memory"]]
    assert max(memory[len(memory) // 2:]) < max(memory[: len(memory) // 2]) * 1.3 + 10
