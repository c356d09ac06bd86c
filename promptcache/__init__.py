"""promptcache: precompute prompt modules' attention states once, splice them at inference.

    import promptcache as pc
    model, tokenizer = pc.testing.tiny_model("llama")
    engine = pc.Engine(model, tokenizer)
    engine.add_schema(xml)
    out = engine.generate('<prompt schema="s"><doc/>question</prompt>')
"""

from . import testing
from .engine.engine import Engine
from .engine.generate import SamplingParams
from .engine.usage import Chunk, Completion, Usage
from .errors import PromptCacheError, PromptError, SchemaError, StoreError
from .markup.builder import SchemaBuilder, make_prompt, prompt_to_xml, schema_to_xml, select
from .markup.chat import BUILTIN_FORMATS, ChatFormat
from .markup.nodes import Module, Param, Prompt, RoleBlock, Schema, Selection, Text, Union
from .markup.parse import parse_prompt, parse_schema

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_FORMATS", "ChatFormat", "Chunk", "Completion", "Engine", "Module", "Param", "Prompt",
    "PromptCacheError", "PromptError", "RoleBlock", "SamplingParams", "Schema", "SchemaBuilder", "SchemaError",
    "Selection", "StoreError", "Text", "Union", "Usage", "make_prompt", "parse_prompt", "parse_schema",
    "prompt_to_xml", "schema_to_xml", "select", "testing",
]
