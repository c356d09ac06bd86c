"""`ModuleRegistry`: the engine's added schemas and where their modules' states are.

A module's states live in the memory tiers of `kv.store.ModuleStore`, else in the disk store,
else they are (re-)encoded on demand. Every key carries the module's context hash
(`identity.module_contexts`: the tokens and positions its states were computed from), so two
versions of a schema never share an entry: a request keeps the layout it was bound to, and what
it re-encodes is stored under that layout's keys, never the new version's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import PromptError
from ..kv.disk import DiskStore, StatesShape, states_key
from ..kv.states import KVStates
from ..kv.store import ModuleStore
from ..markup.check import check_schema
from ..markup.layout import SchemaLayout, compile_schema
from ..markup.nodes import Schema, Text
from ..markup.parse import parse_schema
from .budget import ModuleBudget
from .encode import encode_schema
from .identity import module_contexts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkout:
    """Stored states for a request's modules, in the order asked, and what had to be encoded."""

    states: list[KVStates]
    written: tuple[str, ...]  # modules this request (re-)encoded
    written_tokens: int


@dataclass(frozen=True)
class SchemaAdded:
    """What adding a schema did: which modules came from the disk store, which were encoded, and the time.

    Attributes:
        name: the schema.
        loaded: modules whose states were read from the disk store.
        encoded: modules encoded by this add.
        seconds: the whole add (parse, compile, load, encode).
        encode_s: of which encoding.
        stored_encode_s: what encoding the loaded modules took when they were stored (their files
            record it; 0 for files written before it was recorded): the time the store saved.
    """

    name: str
    loaded: tuple[str, ...]
    encoded: tuple[str, ...]
    seconds: float
    encode_s: float
    stored_encode_s: float


@dataclass(frozen=True, eq=False)
class SchemaVersion:
    """One compiled version of a schema: its layout and, per module, the hash of its states' context.

    A request is bound to the version it was planned against, whatever is added after it.
    """

    layout: SchemaLayout
    contexts: dict[str, str]  # module path -> sha256 of the (token, position) context of its states

    @classmethod
    def of(cls, layout: SchemaLayout) -> SchemaVersion:
        return cls(layout, module_contexts(layout))

    @property
    def name(self) -> str:
        return self.layout.name

    def key(self, path: str) -> str:
        """The memory-store key of a module: schema name, module path, context hash."""
        return f"{self.layout.name}\0{path}\0{self.contexts.get(path, '')}"

    def cacheable(self) -> set[str]:
        return {p for p, m in self.layout.modules.items() if m.cache and m.token_ids}


class ModuleRegistry:
    """Schemas by name, their current versions, and their modules' states across tiers.

    Args:
        adapter: the model adapter (encodes modules).
        tokenizer / chat_format: compile schemas into token layouts.
        store: the memory tiers.
        disk: the persistent store, or None.
        identity: returns the engine's identity (hashed into disk keys); called lazily.
        progress: show a progress bar while encoding.
    """

    def __init__(self, adapter, tokenizer, chat_format, store: ModuleStore, disk: DiskStore | None,
                 identity: Callable[[], dict[str, str]], progress: bool = True):
        self.adapter, self.tokenizer, self.chat_format = adapter, tokenizer, chat_format
        self.store, self.disk, self.identity, self.progress = store, disk, identity, progress
        self.param_filler = " "  # text encoded in parameter slots (markup.layout.compile_schema)
        self.budget: ModuleBudget | None = None  # the added schemas' module bytes (engine.budget)
        self.versions: dict[str, SchemaVersion] = {}
        self._staged: SchemaVersion | None = None  # the version add() is encoding, not yet published
        self.added: dict[str, SchemaAdded] = {}  # per schema, what its last add did
        self._tally: _Tally | None = None  # what the add in progress loaded and encoded
        self.lock = threading.RLock()

    # ---- schemas ---------------------------------------------------------------------------

    def add(self, schema: str | os.PathLike | Schema, base_dir: str | os.PathLike | None = None) -> SchemaLayout:
        """Parse and validate a schema, compile it, load or encode its cacheable modules, publish it.

        Atomic: when loading or encoding fails, the previous version stays current, untouched.
        """
        start = time.perf_counter()
        if isinstance(schema, Schema):
            check_schema(schema)  # the same rules, in the same words, as PML text gets
        else:
            schema = parse_schema(schema, base_dir=base_dir)
        _check_text_fits(schema, self.adapter.max_positions)
        layout = compile_schema(schema, self.tokenizer, self.chat_format, param_filler=self.param_filler)
        if layout.length > self.adapter.max_positions:
            raise PromptError(f"schema '{layout.name}' is {layout.length} positions long; the model's "
                              f"context window is {self.adapter.max_positions}")
        version = SchemaVersion.of(layout)
        with self.lock:
            if self.budget is not None:
                self.budget.check(version, self.versions)  # before encoding anything
            self._staged = version
            self._tally = _Tally()
            try:
                self.checkout(version, sorted(p for p in version.cacheable() if version.key(p) not in self.store))
            finally:
                self._staged, tally = None, self._tally
                self._tally = None
            self.added[layout.name] = SchemaAdded(layout.name, tuple(tally.loaded), tuple(tally.encoded),
                                                  time.perf_counter() - start, tally.encode_s,
                                                  tally.stored_encode_s)
            old = self.versions.get(layout.name)
            self.versions[layout.name] = version
            if old is not None:
                self._drop_unused(old, version)
        return layout

    def remove(self, name: str) -> None:
        """Forget a schema and drop its modules' states from memory (the disk store keeps them)."""
        with self.lock:
            version = self.current(name)
            for path in version.layout.modules:
                self.store.remove(version.key(path))
            del self.versions[name]

    def current(self, name: str) -> SchemaVersion:
        try:
            return self.versions[name]
        except KeyError:
            valid = ", ".join(sorted(self.versions)) or "(none added yet: call add_schema first)"
            raise PromptError(f"unknown schema '{name}'; added schemas: {valid}") from None

    def cached_module(self, schema: str, module: str) -> SchemaVersion:
        version = self.current(schema)
        if module not in version.cacheable():
            valid = ", ".join(sorted(p for p in version.cacheable() if p)) or "(none)"
            raise PromptError(f"schema '{schema}' has no cached module '{module}'; cached modules: {valid}")
        return version

    def _drop_unused(self, old: SchemaVersion, new: SchemaVersion) -> None:
        keep = {new.key(p) for p in new.layout.modules}
        for path in old.layout.modules:
            if old.key(path) not in keep:
                self.store.remove(old.key(path))

    # ---- states ----------------------------------------------------------------------------

    def checkout(self, version: SchemaVersion, paths: Sequence[str]) -> Checkout:
        """States of `paths`: from memory, else the disk store, else encoded now.

        States encoded for a version that is no longer current (a request planned before the schema
        was redefined) serve that request only: they are not stored.
        """
        with self.lock:
            found = {p: self.store.get(version.key(p)) for p in paths}
            missing = {p for p, s in found.items() if s is None}
            if missing:
                found.update(self._load(version, missing))
                missing = {p for p, s in found.items() if s is None}
            written_tokens = 0
            if missing:
                fresh = self._encode(version, missing)
                found.update(fresh)
                written_tokens = sum(len(s) for s in fresh.values())
        return Checkout([found[p] for p in paths], tuple(sorted(missing)), written_tokens)

    def _live(self, version: SchemaVersion) -> bool:
        return version is self._staged or self.versions.get(version.name) is version

    def _disk_key(self, version: SchemaVersion, path: str) -> str:
        return states_key(**self.identity(), context=version.contexts[path])

    def _load(self, version: SchemaVersion, paths: set[str]) -> dict[str, KVStates]:
        """States of `paths` found in the disk store (also put in the module store)."""
        found = {}
        for path in sorted(paths) if self.disk is not None else ():
            states = self.disk.load(self._disk_key(version, path), device=self.adapter.device,
                                    expect=StatesShape(self.adapter.num_layers, *self.adapter.kv_geometry,
                                                       self.adapter.dtype))
            if states is not None and not _matches(states, version.layout.modules[path]):
                logger.warning("ignoring stored states of %s/%s: their tokens or positions are not the "
                               "module's", version.name, path)
                states = None
            if states is not None:
                if version is self._staged:
                    self._tally.loaded.append(path)
                    self._tally.stored_encode_s += _recorded_seconds(self.disk.meta(self._disk_key(version, path)))
                if self._live(version):  # NOTE: a small budget may evict it from the store right away
                    self.store.put(version.key(path), states)
                found[path] = states
        if found:
            logger.info("loaded %d modules of %s from %s", len(found), version.name, self.disk.root)
        return found

    def _encode(self, version: SchemaVersion, want: set[str]) -> dict[str, KVStates]:
        everything = version.cacheable()
        if version is not self._staged:
            logger.info("re-encoding evicted modules of %s: %s", version.name, sorted(want))
        start = time.perf_counter()
        states = encode_schema(self.adapter, version.layout, None if want == everything else want,
                               progress=self.progress)
        seconds = time.perf_counter() - start
        total = sum(len(st) for st in states.values()) or 1
        if version is self._staged:
            self._tally.encoded.extend(sorted(states))
            self._tally.encode_s += seconds
        if self._live(version):
            for path, st in states.items():
                self.store.put(version.key(path), st)
                if self.disk is not None:  # each module's share of the encode time: what loading it saves
                    meta = {"schema": version.name, "module": path, "encode_s": f"{seconds * len(st) / total:.4f}"}
                    self.disk.save(self._disk_key(version, path), st, meta)
        return states

    # ---- pins and inspection ---------------------------------------------------------------

    def pin(self, schema: str, module: str) -> None:
        with self.lock:
            version = self.cached_module(schema, module)
            self.checkout(version, [module])
            self.store.pin(version.key(module))

    def unpin(self, schema: str, module: str) -> None:
        with self.lock:
            self.store.unpin(self.cached_module(schema, module).key(module))

    def states(self, schema: str, module: str) -> KVStates | None:
        """A module's states if they are in memory now (no loading, no encoding)."""
        return self.store.get(self.cached_module(schema, module).key(module))

    def tier(self, schema: str, module: str) -> str | None:
        """"device", "host", or None when the module's states are not in memory."""
        return self.store.tier_of(self.cached_module(schema, module).key(module))


@dataclass
class _Tally:
    """What the add in progress loaded and encoded (`SchemaAdded`'s fields)."""

    loaded: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)
    encode_s: float = 0.0
    stored_encode_s: float = 0.0


def _recorded_seconds(meta: dict[str, str] | None) -> float:
    """The encode time a stored module's file records (0 when it records none, or nonsense)."""
    try:
        seconds = float((meta or {}).get("encode_s", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return seconds if 0.0 <= seconds < 1e7 else 0.0


def _matches(states: KVStates, module) -> bool:
    """Whether loaded states are exactly the module's tokens at its positions (and one per layer)."""
    return (tuple(states.token_ids) == tuple(module.token_ids)
            and states.positions.tolist() == list(module.positions))


MAX_BYTES_PER_TOKEN = 256  # more text than any token holds: a bound checked before tokenizing


def _check_text_fits(schema: Schema, max_positions: int) -> None:
    """Refuse a schema whose text cannot fit the context window before spending time tokenizing it."""
    size, stack = 0, list(schema.children)
    while stack:
        node = stack.pop()
        if isinstance(node, Text):
            size += len(node.text.encode("utf-8"))
        stack.extend(getattr(node, "children", ()) or getattr(node, "members", ()))
    if size > MAX_BYTES_PER_TOKEN * max_positions:
        raise PromptError(f"schema '{schema.name}' holds {size} bytes of text: more than its tokens could be "
                          f"and still fit the model's context window of {max_positions} "
                          f"(at most {MAX_BYTES_PER_TOKEN} bytes a token)")
