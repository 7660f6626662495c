"""Developer tools of samtone-kernels (not shipped in the wheel): run them from the repository root as
modules, e.g. ``python -m tools.kernel_analysis.compile_for_gpu``."""
