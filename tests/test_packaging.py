"""The built wheel ships every module and config, and imports on its own (not through the editable install)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"framework": "longreach", "parallel": "longreach/parallel", "kernels": "longreach/kernels",
           "launchers": "longreach/launchers", "configs": "longreach/configs"}

CHECK = textwrap.dedent("""
    import importlib, json, sys, traceback
    from pathlib import Path
    target = Path(sys.argv[1]).resolve()
    import longreach
    assert Path(longreach.__file__).resolve().is_relative_to(target), longreach.__file__
    heavy = sorted(m for m in ("transformers", "deepspeed", "triton") if m in sys.modules)
    names = []
    for f in sorted((target / "longreach").rglob("*.py")):
        rel = f.relative_to(target).with_suffix("").parts
        if rel[-1] == "__main__":
            continue
        names.append(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    failed = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
            if not Path(mod.__file__).resolve().is_relative_to(target):
                failed[name] = "imported from " + mod.__file__
        except Exception:
            failed[name] = traceback.format_exc(limit=3)
    from importlib import resources
    configs = sorted(p.name for p in resources.files("longreach.configs").iterdir() if p.name.endswith(".yaml"))
    print(json.dumps({"heavy": heavy, "imported": names, "failed": failed, "configs": configs}))
""")


def _copy_sources(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, dst / folder, ignore=ignore)


def test_wheel_ships_and_imports_every_module(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _copy_sources(src)  # build from a copy: the checkout's build/ holds the editable link farm
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("longreach-*.whl"))
    assert len(wheels) == 1
    target = tmp_path / "site"
    with zipfile.ZipFile(wheels[0]) as zf:
        shipped = set(zf.namelist())
        zf.extractall(target)  # a pure-Python wheel installs by unpacking into a --target folder
    entry = [n for n in shipped if n.endswith("entry_points.txt")]
    assert entry and "longreach = longreach.launchers.cli:main" in (target / entry[0]).read_text()

    # every source file of every folder is in the wheel (setuptools does not discover remapped sub-packages)
    missing = []
    for folder, pkg in FOLDERS.items():
        for f in sorted((src / folder).rglob("*")):
            if f.is_file() and f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                name = f"{pkg}/{f.relative_to(src / folder).as_posix()}"
                if name not in shipped:
                    missing.append(name)
    assert not missing, f"not in the wheel: {missing}"

    # import every module with the wheel first on sys.path (the editable install must not be what loads)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(target), PYTHONSAFEPATH="1", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", CHECK, str(target)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["failed"], "\n".join(f"{k}: {v}" for k, v in report["failed"].items())
    assert report["heavy"] == [], f"'import longreach' pulled in {report['heavy']}"
    for name in ("longreach.configio", "longreach.data.loader", "longreach.launchers.cli", "longreach.parallel",
                 "longreach.kernels"):
        assert name in report["imported"]
    assert "demo.yaml" in report["configs"]


@pytest.mark.parametrize("pkg", ["kernels", "parallel", "launchers"])
def test_bare_folders_refuse_to_import(pkg: str, tmp_path: Path) -> None:
    # framework/ARCHITECTURE.md §7: a bare kernels/ on sys.path must not load as top-level 'kernels'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    res = subprocess.run([sys.executable, "-c", f"import {pkg}"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert res.returncode != 0 and "ImportError" in res.stderr
