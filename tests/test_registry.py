"""Method and dataset registries: built-ins, entry points, clear unknown-name errors."""

import ast
import sys
import textwrap
from pathlib import Path

import pytest

import bench
from bench.data import DATASETS
from bench.method import METHODS, Base
from bench.registry import Registry, UnknownNameError

ROOT = Path(bench.__file__).resolve().parent.parent


def test_every_method_module_is_imported_and_registers():
    imported = {m.__module__ for m in (METHODS.get(n) for n in METHODS.names())}
    files = {f"bench.methods.{p.stem}" for p in (ROOT / "methods").glob("*.py") if not p.stem.startswith("_")}
    assert files <= imported, f"modules in methods/ that register nothing: {files - imported}"


def test_no_method_name_in_bench():
    """The core never branches on a method: no registered name appears as a string in bench/."""
    names = set(METHODS.names())
    offenders = []
    for path in (ROOT / "bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                offenders.append(f"{path.name}: {node.value!r}")
    assert not offenders


def test_unknown_names_list_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown method 'vanila'; valid methods: .*st-unet.*vanilla"):
        METHODS.get("vanila")
    with pytest.raises(UnknownNameError, match="unknown dataset 'thyroid'; valid datasets: .*synthetic"):
        DATASETS.get("thyroid")


def test_duplicate_registration_is_an_error():
    reg: Registry[object] = Registry("thing", "bench", "thyrobench.none")
    reg.register("a", object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", int)


def test_entry_point_plugins_register(tmp_path, monkeypatch):
    """An outside package registers a method through the `thyrobench.methods` entry-point group."""
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(textwrap.dedent('''
        from bench.method import MethodInfo, register
        from bench.methods.vanilla import MultiTaskBase

        @register
        class Mine(MultiTaskBase):
            info = MethodInfo("my-method", "base", "mtl", "me 2026", "an outside plugin")
    '''))
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[thyrobench.methods]\nmine = my_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh: Registry[type] = Registry("method", "bench.methods", "thyrobench.methods")
    monkeypatch.setattr("bench.method.METHODS", fresh)
    fresh.load()
    cls = fresh.get("my-method")
    assert issubclass(cls, Base) and cls.info.summary == "an outside plugin"
    sys.modules.pop("my_plugin", None)


def test_harness_imports_beside_huggingface_datasets(tmp_path):
    """`bench.datasets` is ours and `datasets` stays HuggingFace's, both importable together."""
    import subprocess

    pytest.importorskip("datasets")
    code = "import datasets, bench.datasets as ours; print(datasets.__file__); print(ours.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in out[0] and out[1].startswith(str(ROOT / "datasets"))
