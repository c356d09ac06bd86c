"""DiskStore: round trips, key hygiene, atomic writes, and every kind of corrupt file read as a miss."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv.disk import DiskStore, states_key
from promptcache.kv.states import KVStates

from .helpers import run_threads

KEY = states_key(model="tiny", module="system", token_ids=[1, 2, 3])


def make_states(n: int = 5, layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0) -> KVStates:
    g = torch.Generator().manual_seed(seed)

    def layer() -> torch.Tensor:
        return torch.randn(1, 2, n, 4, generator=g).to(dtype)  # [1, kv_heads, seq, head_dim]

    return KVStates(tuple(range(10, 10 + n)), torch.arange(3, 3 + n),
                    tuple(layer() for _ in range(layers)), tuple(layer() for _ in range(layers)))


def assert_same(a: KVStates, b: KVStates) -> None:
    assert a.token_ids == b.token_ids and torch.equal(a.positions, b.positions)
    for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_states_key_is_stable_and_canonical():
    k1 = states_key(model="m", dtype=torch.bfloat16, ids=(1, 2), config={"a": 1, "b": [2, 3]})
    k2 = states_key(config={"b": [2, 3], "a": 1}, ids=[1, 2], dtype=torch.bfloat16, model="m")
    assert k1 == k2 and len(k1) == 64 and all(c in "0123456789abcdef" for c in k1)
    assert k1 != states_key(model="m", dtype=torch.float16, ids=(1, 2), config={"a": 1, "b": [2, 3]})
    assert states_key(ids=torch.tensor([1, 2])) == states_key(ids=[1, 2])
    with pytest.raises(PromptCacheError):
        states_key(model=object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip(tmp_path, dtype):
    store = DiskStore(tmp_path)
    states = make_states(dtype=dtype)
    path = store.save(KEY, states, meta={"module": "system"})
    assert path.exists() and path.parent.name == KEY[:2]
    assert KEY in store and store.keys() == [KEY] and store.nbytes() == path.stat().st_size
    assert_same(store.load(KEY), states)
    assert store.meta(KEY) == {"module": "system"}
    assert store.delete(KEY) and not store.delete(KEY)
    assert store.load(KEY) is None and KEY not in store and store.keys() == []


def test_save_replaces_and_accepts_views(tmp_path):
    store = DiskStore(tmp_path)
    store.save(KEY, make_states(seed=1))
    view = make_states(n=9, seed=2).slice(2, 6)  # non-contiguous views
    store.save(KEY, view)
    assert_same(store.load(KEY), view)


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABCDEF0123456789", "abc", "g" * 20, "a" * 65, "",
                                 "0123456789abcdef/x"])
def test_bad_keys_are_refused(tmp_path, key):
    store = DiskStore(tmp_path)
    with pytest.raises(StoreError):
        store.save(key, make_states())
    with pytest.raises(StoreError):
        store.load(key)
    assert key not in store


def corrupt_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_flip_middle(path):
    data = bytearray(path.read_bytes())
    mid = len(data) - 40  # inside the tensor bytes, past the JSON header
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])
    path.write_bytes(bytes(data))


def corrupt_garbage(path):
    path.write_bytes(os.urandom(300))


def corrupt_empty(path):
    path.write_bytes(b"")


def corrupt_header_json(path):
    data = bytearray(path.read_bytes())
    data[10] = ord("{")  # breaks the JSON header
    path.write_bytes(bytes(data))


def rewrite(path, **changes):
    """A well-formed safetensors file with altered tensors or metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, value in changes.items():
        if name in meta:
            meta[name] = value
        elif value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, str(path), metadata=meta)


CORRUPTIONS = {
    "truncated": corrupt_truncate,
    "flipped": corrupt_flip_middle,
    "garbage": corrupt_garbage,
    "empty": corrupt_empty,
    "bad_header": corrupt_header_json,
    "wrong_key": lambda p: rewrite(p, key="f" * 64),
    "wrong_version": lambda p: rewrite(p, version="99"),
    "missing_tensor": lambda p: rewrite(p, **{"v.1": None}),
    "bad_layer_count": lambda p: rewrite(p, num_layers="3"),
    "inconsistent_shape": lambda p: rewrite(p, **{"k.1": torch.zeros(1, 2, 4, 4)}),
    "bad_positions_dtype": lambda p: rewrite(p, positions=torch.arange(5, dtype=torch.int32)),
    "changed_values": lambda p: rewrite(p, **{"k.0": torch.zeros(1, 2, 5, 4)}),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_is_a_miss_and_removed(tmp_path, corrupt, caplog):
    store = DiskStore(tmp_path)
    path = store.save(KEY, make_states())
    corrupt(path)
    assert store.load(KEY) is None
    assert not path.exists() and KEY not in store
    assert "corrupt" in caplog.text
    store.save(KEY, make_states())  # the caller re-encodes
    assert store.load(KEY) is not None


def test_killed_writer_leaves_no_partial_file(tmp_path, monkeypatch):
    store = DiskStore(tmp_path)
    good = make_states(seed=1)
    store.save(KEY, good)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        store.save(KEY, make_states(seed=2))
    monkeypatch.undo()
    assert_same(store.load(KEY), good)  # the old file is intact
    assert [p.name for p in (tmp_path / KEY[:2]).iterdir()] == [KEY + ".safetensors"]
    # A stale temp file from a SIGKILLed process is ignored.
    (tmp_path / KEY[:2] / ".tmp-abc.part").write_bytes(b"partial")
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / "notes.json").write_text(json.dumps({}))
    assert store.keys() == [KEY]


def test_concurrent_saves_and_loads(tmp_path):
    store = DiskStore(tmp_path)
    states = make_states()

    def work(i: int) -> None:
        key = states_key(i=i % 4)
        for _ in range(10):
            store.save(key, states)
            got = store.load(key)
            assert got is not None
            assert_same(got, states)

    run_threads(work)
    assert len(store.keys()) == 4


def test_bad_meta_refused(tmp_path):
    with pytest.raises(StoreError):
        DiskStore(tmp_path).save(KEY, make_states(), meta={"n": 1})
