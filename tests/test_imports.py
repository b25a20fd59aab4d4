"""The harness never shadows a popular PyPI package: HuggingFace `datasets` and thyrobench live side by side."""

import subprocess
import sys

import pytest

pytest.importorskip("datasets", reason="HuggingFace datasets is a test dependency")

PROBE = """
import importlib.util, datasets, bench.datasets, bench.datasets.synthetic, bench.methods, bench.leaderboard
assert hasattr(datasets, "load_dataset"), datasets.__file__          # HuggingFace's, not our folder
assert "site-packages" in datasets.__file__, datasets.__file__
assert bench.datasets.__name__ == "bench.datasets"
for name in ("methods", "leaderboard"):                              # nothing generic installed at top level
    assert importlib.util.find_spec(name) is None, name
from bench.data import DATASETS
print(sorted(DATASETS.names()))
"""


def test_huggingface_datasets_and_bench_datasets_import_together(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "synthetic" in done.stdout and "folder" in done.stdout
