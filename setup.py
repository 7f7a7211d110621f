"""Packaging: map the top-level folders into the one ``longreach`` namespace.

setuptools does not discover sub-packages under a remapped folder, so the package list is
generated here by walking the folders (framework/ARCHITECTURE.md §7).
"""
from pathlib import Path

from setuptools import setup

ROOTS = {
    "longreach": "framework",
    "longreach.parallel": "parallel",
    "longreach.kernels": "kernels",
    "longreach.launchers": "launchers",
}


def _packages() -> tuple[list[str], dict[str, str]]:
    here = Path(__file__).parent
    packages, package_dir = [], {}
    for name, folder in ROOTS.items():
        package_dir[name] = folder
        for init in sorted((here / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(here / folder)
            if "__pycache__" in rel.parts:
                continue
            packages.append(".".join((name, *rel.parts)) if rel.parts else name)
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()
# The YAML recipes ship inside the package as data (``longreach.configs``), read with importlib.resources.
PACKAGES.append("longreach.configs")
PACKAGE_DIR["longreach.configs"] = "configs"
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"longreach.configs": ["*.yaml"]},
    include_package_data=False,
)
