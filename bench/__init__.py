"""Benchmarks and experiments, run as modules from the repository root: ``python -m bench.speed``
(speed and memory against the peers), ``python -m bench.quality`` (retrieval quality),
``python -m bench.cached_memory``, ``python -m bench.torch_chunks``. The scripts are thin: the
harness (timing, peak memory, result files) is ``bench.harness``, the workloads and implementations
``bench.peers``; the tests import those (and ``bench.quality``), not the scripts."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of the bench scripts: the module docstring as written, and every option's default
    (unless its help already says it, or there is none to show: a flag, or None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {value})"
