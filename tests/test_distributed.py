"""Cross-device negatives: 3 CPU processes over gloo match the single-process loss exactly.

Each worker (tests/distributed_worker.py) checks every backend (the kernels under the interpreter) on
random configurations: hard negatives, every direction set, both partitions, group ids crossing
ranks, unequal local sizes, a tensor temperature. A hung collective fails by the deadline.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import distributed_worker  # tests/ is importable under pytest, and the spawned workers inherit its path
import pytest
import torch
import torch.multiprocessing as mp

from samtone_kernels import distributed, fused_samtone_loss

DEADLINE_S = 240


def _entry(rank, world, init_method, batches):
    distributed_worker.main(rank, world, init_method, batches)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_and_gradients_match_single_process():
    """3 ranks (one spawn: its start-up is most of the cost): equal local sizes take the
    reduce-scatter's unpadded path, unequal ones its padded path."""
    pytest.importorskip("triton")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    batches = [([3, 3, 3], 3), ([2, 4, 3], 4)]  # (each rank's pairs, configurations per backend)
    world = 3
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.start_processes(
        _entry, args=(world, init_method, batches), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):  # raises with the worker's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {DEADLINE_S} s (a hung collective?)")


def test_without_a_process_group_gathering_is_single_process(monkeypatch):
    monkeypatch.setattr(distributed, "_warned_single_process", False)
    q, d = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="single-process"):
        gathered = fused_samtone_loss(q, d, backend="torch", gather_across_devices=True)
    torch.testing.assert_close(gathered, fused_samtone_loss(q, d, backend="torch"))
    with pytest.raises(TypeError, match="gather_across_devices"):
        fused_samtone_loss(q, d, backend="torch", gather_across_devices="yes")


def _run_example(root: str, command: list[str]) -> tuple[int, str, str]:
    import signal
    import subprocess

    # Its own session, so a timeout takes torchrun's workers down with it.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun did not finish in {DEADLINE_S} s")
    return process.returncode, out, err


def test_ddp_example_runs_under_torchrun():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(root, "examples", "ddp_samtone.py"),
        "--steps",
        "6",
        "--batch",
        "8",
    ]
    code, out, err = _run_example(root, command)
    if code != 0 and "SIGABRT" in err and "step   5" in out:
        # torch 2.13's gloo can abort while a finished worker's interpreter tears down (see
        # distributed_worker.py): training completed, so run it once more rather than fail on it.
        import warnings

        warnings.warn("the DDP example aborted after training completed (gloo teardown); ran it again", stacklevel=1)
        code, out, err = _run_example(root, command)
    assert code == 0, out[-2000:] + err[-3000:]
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0], out  # steps 0 and 5: it learns


def test_ddp_example_without_torchrun_says_to_use_it():
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "ddp_samtone.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode != 0 and "torchrun" in done.stderr, done.stderr[-2000:]
