"""DiskStore: round trips, key hygiene, atomic writes, and every kind of corrupt file read as a miss."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from promptcache.errors import PromptCacheError, StoreError
from promptcache.kv import disk
from promptcache.kv.disk import DiskStore, states_key
from promptcache.kv.states import KVStates

from .helpers import fifo_released, finishes, run_threads

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
    assert store.save(KEY, states, meta={"module": "system"}) is True
    path = store.path(KEY)
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
    "changed_meta": lambda p: rewrite(p, meta=json.dumps({"module": "other"})),
    "trailing_bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 8),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_file_is_a_miss_and_removed(tmp_path, corrupt, caplog):
    store = DiskStore(tmp_path)
    store.save(KEY, make_states())
    path = store.path(KEY)
    corrupt(path)
    assert store.load(KEY) is None
    assert not path.exists() and KEY not in store
    assert "corrupt" in caplog.text and store.read_failures == 1
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


def test_loaded_states_are_owned_not_mapped(tmp_path):
    store = DiskStore(tmp_path)
    states = make_states(n=64)
    store.save(KEY, states)
    loaded = store.load(KEY)
    path = store.path(KEY)
    with open(path, "r+b") as f:  # overwrite the tensor bytes in place (same inode, no rename)
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        f.write(b"\xff" * (size - size // 2))
    assert_same(loaded, states)
    assert store.load(KEY) is None  # the edited file itself fails its checksum: a miss


def test_file_truncated_after_load_does_not_crash(tmp_path):
    # A memory-mapped load dies of SIGBUS here, so run it in a child process.
    script = textwrap.dedent(f"""
        import os, torch
        from promptcache.kv.disk import DiskStore
        from tests.kv.test_disk import KEY, assert_same, make_states
        store = DiskStore({str(tmp_path)!r})
        states = make_states(n=4096)
        store.save(KEY, states)
        loaded = store.load(KEY)
        os.truncate(store.path(KEY), 100)
        assert_same(loaded, states)
        print("same", float(sum(k.sum() for k in loaded.keys)))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.startswith("same")


def _fifo(path):
    os.mkfifo(path)


def _directory(path):
    path.mkdir()
    (path / "x").write_bytes(b"x")  # non-empty: a rename cannot replace it


def _symlink(path):
    target = path.parent / "elsewhere.safetensors"
    DiskStore(path.parent.parent).save(KEY, make_states())  # a valid file, then moved behind a link
    os.replace(path, target)
    path.symlink_to(target)


ODD = {"fifo": _fifo, "directory": _directory, "symlink": _symlink}


@pytest.mark.parametrize("make", ODD.values(), ids=ODD.keys())
def test_odd_file_at_the_key_path_is_a_miss_that_never_blocks(tmp_path, make, caplog):
    store = DiskStore(tmp_path)
    path = store.path(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    make(path)
    with fifo_released(path):
        assert finishes(lambda: store.load(KEY)) is None
        assert finishes(lambda: store.meta(KEY)) is None
    assert KEY not in store and store.keys() == [] and store.read_failures == 2
    assert "not a regular file" in caplog.text or "symbolic links" in caplog.text
    assert os.path.lexists(path)  # left alone: not ours to delete


def test_save_over_a_directory_fails_softly(tmp_path):
    store = DiskStore(tmp_path)
    store.path(KEY).parent.mkdir(parents=True)
    _directory(store.path(KEY))
    assert store.save(KEY, make_states()) is False
    assert store.write_failures == 1 and not store.delete(KEY) and store.path(KEY).is_dir()


def test_save_over_a_fifo_replaces_it(tmp_path):
    store = DiskStore(tmp_path)
    store.path(KEY).parent.mkdir(parents=True)
    os.mkfifo(store.path(KEY))
    states = make_states()
    assert finishes(lambda: store.save(KEY, states)) is True
    assert_same(store.load(KEY), states)


@pytest.mark.parametrize("where, error", [
    ("os.replace", errno.ENOSPC),
    ("os.fsync", errno.ENOSPC),
    ("tempfile.mkstemp", errno.EROFS),
])
def test_full_or_read_only_disk_is_logged_counted_and_not_raised(tmp_path, monkeypatch, caplog, where, error):
    store = DiskStore(tmp_path)
    good = make_states(seed=1)
    store.save(KEY, good)

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    module, name = where.split(".")
    monkeypatch.setattr({"os": os, "tempfile": tempfile}[module], name, fail)
    assert store.save(KEY, make_states(seed=2)) is False
    assert store.save(states_key(other=1), good) is False
    monkeypatch.undo()
    assert store.write_failures == 2 and os.strerror(error) in caplog.text
    assert_same(store.load(KEY), good)
    assert [p.name for p in store.path(KEY).parent.iterdir()] == [KEY + ".safetensors"]  # no temp file left


@pytest.mark.parametrize("root", ["", "  "])
def test_empty_store_dir_is_refused(root):
    with pytest.raises(StoreError, match="store_dir"):
        DiskStore(root)


def test_store_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match="store_dir"):
        DiskStore(tmp_path / "file")


def test_a_file_replaced_while_being_read_is_not_deleted(tmp_path, monkeypatch):
    store = DiskStore(tmp_path)
    store.save(KEY, make_states(seed=1))
    good = make_states(seed=2)

    def read_then_replaced(f, key, *checks):
        DiskStore(tmp_path).save(key, good)  # another writer renames a good file over the one being read
        raise StoreError("corrupt as read")

    monkeypatch.setattr(disk, "_read", read_then_replaced)
    assert store.load(KEY) is None
    monkeypatch.undo()
    assert_same(store.load(KEY), good)
