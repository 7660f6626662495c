"""Benchmarks and experiments: ``python bench/speed.py`` (speed and memory against the peers),
``python -m bench.quality`` (retrieval quality), ``python bench/cached_memory.py``. A package so that
the tests import them as ``bench.speed`` and ``bench.quality``."""

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
