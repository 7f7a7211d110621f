"""Evidence studies: one small experiment per method, with the paper's published effect beside ours.

``longreach study NAME`` runs one (recipe ``configs/study_NAME.yaml``); each study module registers itself
with :func:`longreach.studies.base.register` when imported. See :mod:`longreach.studies.base` for the
result types and the resumable step cache.
"""
from __future__ import annotations

import importlib

from longreach.studies.base import STUDIES, Finding, Study, StudyContext, StudyResult, Table, register

__all__ = ["MODULES", "STUDIES", "Finding", "Study", "StudyContext", "StudyResult", "Table", "get_study",
           "register"]

#: Study name -> the module that registers it (imported on first use: the studies pull in heavy parts).
MODULES: dict[str, str] = {
    "extension": "longreach.studies.extension",
    "sparse": "longreach.studies.sparse",
    "mixtures": "longreach.studies.mixtures",
    "linear": "longreach.studies.linear",
}


def get_study(name: str) -> Study:
    """The registered study ``name`` (imports its module); KeyError lists the known names."""
    if name not in MODULES:
        raise KeyError(f"unknown study {name!r}; known: {', '.join(MODULES)}")
    importlib.import_module(MODULES[name])
    return STUDIES[name]
