"""bench/gpu_check.sh --dry-run: the device check's plumbing on CPU (tests, bench rows, the three files
that come back), so that a typo never costs device minutes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_makes_the_three_files_with_every_step_passing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "speed.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| tests | 0 |" in summary and "| speed | 0 |" in summary, summary
    assert "eager-chunked" in summary and "ours-fused: no samtone row" in summary, summary
    assert "matryoshka-samtone" in summary and "ours-per-prefix" in summary, summary
    tile = "16,32,16,4,1,0,1"  # a pinned config with its walk: each segment alone, one tile per sweep
    assert f"| tile {tile} | 0 |" in summary and f"== tile {tile}: env SAMTONE_TRITON_CONFIG" in summary
    resident = "16,16,32,4,1,0,1,1"  # the resident backward, pinned (D = 32 within its tile)
    assert f"| d128 tile {resident} | 0 |" in summary, summary
