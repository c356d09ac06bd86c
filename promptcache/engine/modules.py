"""`ModuleRegistry`: the engine's added schemas and where their modules' states are.

A module's states live in the memory tiers of `kv.store.ModuleStore`, else in the disk store,
else they are (re-)encoded on demand.

NOTE: the registry's lock guards its dicts and the store only, never a load or an encode: adding a
schema (seconds to minutes of encoding) must not hold up requests on other schemas, or on the
version it replaces. Adds of one name take turns (`_turn`), so the last to start is the last
to publish, with its states. Every key carries the module's context hash
(`identity.module_contexts`: the tokens and positions its states were computed from), so two
versions of a schema never share an entry: a request keeps the layout it was bound to, and what
it re-encodes is stored under that layout's keys, never the new version's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import PromptError
from ..kv.disk import DiskStore, StatesShape, states_key
from ..kv.states import KVStates
from ..kv.store import ModuleStore
from ..markup.check import check_schema
from ..markup.layout import SchemaLayout, compile_schema
from ..markup.nodes import Schema
from ..markup.parse import parse_schema
from . import checks
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


@dataclass(frozen=True)
class Filled:
    """States of missing modules: read from the disk store, or encoded now (and how long each took)."""

    loaded: dict[str, KVStates]
    encoded: dict[str, KVStates]
    encode_s: float = 0.0
    stored_encode_s: float = 0.0  # what the loaded modules' files say their encoding took

    @property
    def states(self) -> dict[str, KVStates]:
        return {**self.loaded, **self.encoded}


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
        self.added: dict[str, SchemaAdded] = {}  # per schema, what its last add did
        self.lock = threading.RLock()
        self._adding: set[str] = set()  # names an add() is loading or encoding now
        self._added = threading.Condition(self.lock)

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
        checks.fits_window(f"schema '{schema.name}'", checks.text_bytes(schema), self.adapter.max_positions)
        layout = compile_schema(schema, self.tokenizer, self.chat_format, param_filler=self.param_filler)
        if layout.length > self.adapter.max_positions:
            raise PromptError(f"schema '{layout.name}' is {layout.length} positions long; the model's "
                              f"context window is {self.adapter.max_positions}")
        version = SchemaVersion.of(layout)
        with self._turn(layout.name):
            self._check_budget(version)  # before encoding anything
            missing = {p for p in version.cacheable() if version.key(p) not in self.store}
            filled = self._fill(version, missing, staged=True)  # no lock held: requests go on
            with self.lock:
                self._check_budget(version)  # again: other schemas may have been added meanwhile
                for path, states in filled.states.items():
                    self.store.put(version.key(path), states)
                old = self.versions.get(layout.name)
                self.versions[layout.name] = version
                if old is not None:
                    self._drop_unused(old, version)
                self.added[layout.name] = SchemaAdded(layout.name, tuple(sorted(filled.loaded)),
                                                      tuple(sorted(filled.encoded)), time.perf_counter() - start,
                                                      filled.encode_s, filled.stored_encode_s)
        return layout

    def _check_budget(self, version: SchemaVersion) -> None:
        if self.budget is not None:
            with self.lock:
                self.budget.check(version, dict(self.versions))

    @contextmanager
    def _turn(self, name: str) -> Iterator[None]:
        """Wait until no other add() of `name` runs, then hold its turn (requests never wait here)."""
        with self._added:
            self._added.wait_for(lambda: name not in self._adding)
            self._adding.add(name)
        try:
            yield
        finally:
            with self._added:
                self._adding.discard(name)
                self._added.notify_all()

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

        States read or encoded for a version that is no longer current (a request planned before the
        schema was redefined) serve that request only: they are not stored.
        """
        with self.lock:
            found = {p: self.store.get(version.key(p)) for p in paths}
        missing = {p for p, s in found.items() if s is None}
        filled = self._fill(version, missing, staged=False)
        if filled.states:
            with self.lock:
                if self._live(version):  # NOTE: a small budget may evict them from the store right away
                    for path, states in filled.states.items():
                        self.store.put(version.key(path), states)
            found.update(filled.states)
        written_tokens = sum(len(s) for s in filled.encoded.values())
        return Checkout([found[p] for p in paths], tuple(sorted(filled.encoded)), written_tokens)

    def _live(self, version: SchemaVersion) -> bool:
        return self.versions.get(version.name) is version

    def _fill(self, version: SchemaVersion, paths: set[str], staged: bool) -> Filled:
        """States of `paths` from the disk store, else encoded; no lock held. `staged`: an add() not yet
        published (its new states are saved to the disk store, as a current version's are)."""
        if not paths:
            return Filled({}, {})
        loaded = self._load(version, paths)
        want = paths - set(loaded)
        encoded = self._encode(version, want, staged) if want else Filled({}, {})
        stored_s = sum(_recorded_seconds(self.disk.meta(self._disk_key(version, p))) for p in loaded) if loaded else 0.0
        return Filled(loaded, encoded.encoded, encoded.encode_s, stored_s)

    def _disk_key(self, version: SchemaVersion, path: str) -> str:
        return states_key(**self.identity(), context=version.contexts[path])

    def _load(self, version: SchemaVersion, paths: set[str]) -> dict[str, KVStates]:
        """States of `paths` found in the disk store."""
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
                found[path] = states
        if found:
            logger.info("loaded %d modules of %s from %s", len(found), version.name, self.disk.root)
        return found

    def _encode(self, version: SchemaVersion, want: set[str], staged: bool) -> Filled:
        """`want` encoded (and saved to the disk store, for a live or staged version): `encoded`, `encode_s`."""
        everything = version.cacheable()
        if not staged:
            logger.info("re-encoding evicted modules of %s: %s", version.name, sorted(want))
        start = time.perf_counter()
        states = encode_schema(self.adapter, version.layout, None if want == everything else want,
                               progress=self.progress)
        seconds = time.perf_counter() - start
        total = sum(len(st) for st in states.values()) or 1
        if self.disk is not None and (staged or self._live(version)):
            for path, st in states.items():  # each module's share of the encode time: what loading it saves
                meta = {"schema": version.name, "module": path, "encode_s": f"{seconds * len(st) / total:.4f}"}
                self.disk.save(self._disk_key(version, path), st, meta)
        return Filled({}, states, seconds)

    # ---- pins and inspection ---------------------------------------------------------------

    def pin(self, schema: str, module: str) -> None:
        version = self.cached_module(schema, module)
        self.checkout(version, [module])  # loads or encodes without the lock
        with self.lock:
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
