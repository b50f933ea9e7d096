"""The one way the benchmark smoke tests load a script of benchmarks/ (a folder of scripts, not a
package): by path, under a module name of the test's choosing. Loading a script also puts
benchmarks/ on sys.path (the scripts do that themselves), so its sibling modules import by name."""

from __future__ import annotations

import importlib.util
import os

BENCH_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))


def load_benchmark(filename: str, name: str | None = None):
    """benchmarks/<filename> executed as module `name` (default: the file's stem)."""
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(filename)[0],
                                                  os.path.join(BENCH_DIR, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
