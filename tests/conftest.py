"""Test-wide settings: the one device switch, Hypothesis profiles, GPU marker.

The device is chosen once, here: CUDA when present, else the CPU with ``TRITON_INTERPRET=1`` so the
Triton kernels run under the interpreter. That variable must be set before triton is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, derandomize=False, print_blob=True, **_common)
settings.register_profile("dev", max_examples=400, print_blob=True, **_common)
settings.register_profile("gpu", max_examples=200, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` when a launch starts (restoring it when the launch
    ends), and again on every call of a ``@triton.jit`` function inside the kernel (never restored):
    the modules of ``tl`` / ``tl.core`` that function's globals hold. Inside one launch a repeat for
    the same modules changes nothing (a patched builtin is no longer a builtin) and costs about a sixth
    of the interpreter's time in this suite, so it is skipped. Tests only; with an interpreter laid out
    otherwise (another triton) nothing is changed."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch_lang is None or scope_type is None or getattr(patch_lang, "once_per_launch", False):
        return
    patched: set[frozenset[int]] = set()  # the module sets patched in the running launch

    def once_per_launch(fn):
        key = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        if key in patched:  # a function called inside the running launch, its modules patched already
            return scope_type()
        scope = patch_lang(fn)
        if not patched:  # the launch's own patch: its restore ends the launch
            restore = scope.restore

            def restore_and_end():
                patched.clear()
                restore()

            scope.restore = restore_and_end
        patched.add(key)
        return scope

    once_per_launch.once_per_launch = True
    interpreter._patch_lang = once_per_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_language_once_per_launch()


def pytest_collection_modifyitems(config, items):
    # The GPU compile check runs in a subprocess from the end of collection on (pytest_collection_finish);
    # its test, which only waits for it, goes last so that every other test runs meanwhile.
    items.sort(key=_is_compile_check)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _is_compile_check(item) -> bool:
    module = getattr(item, "module", None)
    return module is not None and module.__name__ == "test_gpu_compile"


def _compile_check_module(session):
    return next((item.module for item in session.items if _is_compile_check(item)), None)


def pytest_collection_finish(session):
    """Subprocess work that runs on one core starts as soon as the selected tests are known, so it
    overlaps the in-process tests (CI has two cores): the GPU compile check. The in-process tests then
    keep to the other core (torch's second thread would only contend with the compile)."""
    module = _compile_check_module(session)
    if module is not None and not session.config.option.collectonly and module.start():
        torch.set_num_threads(1)


def pytest_sessionfinish(session):
    """A run that ends before the compile check's test (a failure with -x, an interrupt) stops it."""
    module = _compile_check_module(session)
    if module is not None:
        module.stop()


@pytest.fixture
def exact_float32():
    """float32 dots in IEEE precision, as the reference (TF32 only when a user allows it); the kernel
    test modules use it for every test (``pytestmark``)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and spares OpenMP's spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
