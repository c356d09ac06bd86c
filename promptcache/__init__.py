"""promptcache: precompute prompt modules' attention states once, splice them at inference.

    import promptcache as pc
    engine = pc.Engine.from_pretrained("smollm2-135m-instruct")   # or pc.Engine(model, tokenizer)
    engine.add_schema(xml)
    out = engine.generate('<prompt schema="s"><doc/>question</prompt>')

The markup layer (parsing, checking, building PML) needs no torch: the engine, sampling and
testing names are imported on first use, so `promptcache validate` and other markup-only uses
start in a fraction of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import PromptCacheError, PromptError, SchemaError, StoreError
from .markup.builder import SchemaBuilder, make_prompt, prompt_to_xml, schema_to_xml, select
from .markup.chat import BUILTIN_FORMATS, ChatFormat
from .markup.nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from .markup.parse import parse_prompt, parse_schema

if TYPE_CHECKING:  # pragma: no cover
    from . import testing
    from .engine.engine import Engine
    from .engine.generate import SamplingParams
    from .engine.scheduler import Scheduler
    from .engine.usage import Chunk, Completion, Usage

__version__ = "0.1.0"

# name -> module it lives in (imported on first access: these import torch)
_LAZY = {
    "Engine": ".engine.engine", "SamplingParams": ".engine.generate", "Chunk": ".engine.usage",
    "Completion": ".engine.usage", "Usage": ".engine.usage", "Recompute": ".engine.recompute",
    "Scheduler": ".engine.scheduler", "testing": ".testing",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'promptcache' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "testing" else getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    "BUILTIN_FORMATS", "ChatFormat", "Chunk", "Completion", "Engine", "Module", "Param", "Prompt",
    "PromptCacheError", "PromptError", "Recompute", "RoleBlock", "SamplingParams", "Scheduler", "Schema",
    "SchemaBuilder", "SchemaError", "Selection", "StoreError", "Text", "Union", "Usage", "make_prompt",
    "parse_prompt", "parse_schema", "prompt_to_xml", "schema_to_xml", "select", "testing",
]
