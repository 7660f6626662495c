"""bench/gpu_check.sh --dry-run: the device check's plumbing on CPU (tests, bench rows, the three files
that come back), so that a typo never costs device minutes."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry_run(out: pathlib.Path, **env: str) -> str:
    """Run the dry run into ``out``; return its summary after checking the three files are there."""
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=out.parent,
        env=dict(os.environ, PYTHON=sys.executable, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "speed.tar.gz", "summary.md"]
    return (out / "summary.md").read_text()


def test_dry_run_makes_the_three_files_with_every_step_passing(tmp_path):
    summary = _dry_run(tmp_path / "out")
    assert "| tests | 0 |" in summary and "| speed | 0 |" in summary, summary
    assert "eager-chunked" in summary and "ours-fused: no samtone row" in summary, summary
    assert "matryoshka-samtone" in summary and "ours-per-prefix" in summary, summary
    tile = "16,32,16,4,1,0,1"  # a pinned config with its walk: each segment alone, one tile per sweep
    assert f"| tile {tile} | 0 |" in summary and f"== tile {tile}: (limit 35 s) env SAMTONE_TRITON_CONFIG" in summary
    resident = "16,16,32,4,1,0,1,1"  # the resident backward, pinned (D = 32 within its tile)
    assert f"| d128 tile {resident} | 0 |" in summary, summary


def test_once_the_deadline_is_spent_the_steps_are_skipped_and_the_files_still_written(tmp_path):
    """The check fits one device call: every step's limit is cut to the time left before the
    deadline (GPU_CHECK_SECONDS less 15 s for the summary), and a step with under 10 s left is skipped."""
    summary = _dry_run(tmp_path / "out", GPU_CHECK_SECONDS="20")
    assert "| tests | skipped | 0 s |" in summary and "| speed | skipped | 0 s |" in summary, summary
    assert "| 0 |" not in summary, summary
