"""The disk store trusts only what its own secret signed, and only states a reader can use: issue 27,
finding "a hand-edited store file with its sha256 recomputed is trusted" (and "kill -9 leaves temp files")."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import promptcache as pc
from promptcache.errors import StoreError
from promptcache.kv.disk import sha256_json
from promptcache.kv.files import TEMP_GRACE_S, TEMP_MAX_AGE_S
from promptcache.kv.states import KVStates

from .conftest import ALL_DOCS_PROMPT, DOCS, make_engine

ARCHS = ("llama", "mistral")  # multi-head and grouped-query attention


def first_logits(engine: pc.Engine) -> torch.Tensor:
    with engine.prefill(engine.plan(ALL_DOCS_PROMPT)) as pre:
        return pre.logits.clone()


def reference(arch: str) -> torch.Tensor:
    engine = make_engine(arch)
    engine.add_schema(DOCS)
    return first_logits(engine)


def stored_engine(arch: str, store) -> pc.Engine:
    engine = make_engine(arch, store_dir=store)
    engine.add_schema(DOCS)
    return engine


def files(store) -> list:
    return sorted(store.rglob("*.safetensors"))


def rewrite_unkeyed(path, edit) -> None:
    """Edit a stored file's tensors and recompute its checksum as anyone can: a plain sha256."""
    with safe_open(str(path), "pt") as f:
        header, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    tensors = edit(tensors)
    h = hashlib.sha256(sha256_json({k: header.get(k) for k in ("format", "version", "key", "num_layers",
                                                                "meta")}).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    save_file(tensors, str(path), metadata=header | {"checksum": h.hexdigest()})


def scaled(tensors):
    return {n: t * 2 if n[:2] in ("k.", "v.") else t for n, t in tensors.items()}


def with_nan(tensors):
    return {n: t.clone().fill_(float("nan")) if n == "v.0" else t for n, t in tensors.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("edit", [scaled, with_nan], ids=["scaled", "nan"])
def test_a_file_edited_without_the_stores_secret_is_a_miss(arch, edit, tmp_path):
    stored_engine(arch, tmp_path)
    for path in files(tmp_path):
        rewrite_unkeyed(path, edit)
    engine = stored_engine(arch, tmp_path)
    torch.testing.assert_close(first_logits(engine), reference(arch), rtol=1e-5, atol=1e-5)
    assert engine.disk.read_failures == len(files(tmp_path)) > 0  # each was refused, and re-encoded


def _nan(st: KVStates) -> KVStates:
    return KVStates(st.token_ids, st.positions, st.keys, (st.values[0].clone().fill_(float("inf")), *st.values[1:]))


SIGNED = {  # what someone holding the secret (or a bug) could write under a module's key
    "nan": _nan,
    "kv_heads": lambda st: KVStates(st.token_ids, st.positions, tuple(torch.cat([k, k], 1) for k in st.keys),
                                    tuple(torch.cat([v, v], 1) for v in st.values)),
    "head_dim": lambda st: KVStates(st.token_ids, st.positions, tuple(k[..., :-1] for k in st.keys),
                                    tuple(v[..., :-1] for v in st.values)),
    "layers": lambda st: KVStates(st.token_ids, st.positions, st.keys[:-1], st.values[:-1]),
    "dtype": lambda st: KVStates(st.token_ids, st.positions, tuple(k.half() for k in st.keys),
                                 tuple(v.half() for v in st.values)),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("edit", SIGNED.values(), ids=SIGNED.keys())
def test_signed_states_a_reader_cannot_use_are_a_miss_never_an_error(arch, edit, tmp_path):
    writer = stored_engine(arch, tmp_path)
    for key in writer.disk.keys():
        writer.disk.save(key, edit(writer.disk.load(key)))
    engine = stored_engine(arch, tmp_path)
    torch.testing.assert_close(first_logits(engine), reference(arch), rtol=1e-5, atol=1e-5)
    assert engine.disk.read_failures == len(files(tmp_path)) > 0


def test_a_file_from_another_store_is_a_miss(tmp_path):
    stored_engine("llama", tmp_path / "a")
    other = stored_engine("llama", tmp_path / "b")
    for a, b in zip(files(tmp_path / "a"), files(tmp_path / "b"), strict=True):
        b.write_bytes(a.read_bytes())  # same keys: the same model and schema
    engine = stored_engine("llama", tmp_path / "b")
    assert engine.disk.read_failures == len(files(tmp_path / "b")) > 0
    torch.testing.assert_close(first_logits(engine), first_logits(other), rtol=1e-5, atol=1e-5)


def test_the_secret_is_the_owners_alone(tmp_path):
    stored_engine("llama", tmp_path)
    secret = tmp_path / ".secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_size == 32
    secret.chmod(0o640)
    with pytest.raises(StoreError, match=r"\.secret.*chmod 600"):
        make_engine("llama", store_dir=tmp_path)


WRITER = textwrap.dedent("""
    import os, sys, torch
    from promptcache.kv.disk import DiskStore, states_key
    from promptcache.kv.states import KVStates

    def hang(fd):  # the temp file is written: say so, and wait to be killed
        print("writing", flush=True)
        sys.stdin.read()

    store = DiskStore(sys.argv[1])
    os.fsync = hang
    states = KVStates((1, 2), torch.arange(2), (torch.zeros(1, 1, 2, 4),), (torch.zeros(1, 1, 2, 4),))
    store.save(states_key(n=1), states)
""")


def temp_files(root) -> list:
    return sorted(root.rglob(".tmp-*.part"))


def test_temp_files_of_killed_writers_are_removed_on_open_and_live_ones_kept(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    killed = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "live")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert killed.stdout.readline() == b"writing\n" and live.stdout.readline() == b"writing\n"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (dead,) = [p for p in temp_files(tmp_path) if "live" not in p.parts]  # a states file's, in its shard
        (alive,) = temp_files(tmp_path / "live")
        assert dead.parent.parent == tmp_path and dead.name.startswith(f".tmp-{killed.pid}-")
        old = time.time() - TEMP_GRACE_S - 5  # the crash was a while ago; the live writer is just slow
        for path in (dead, alive):
            os.utime(path, (old, old))
        nameless = dead.parent / ".tmp-abc.part"  # an older version's name: no pid
        nameless.write_bytes(b"partial")
        os.utime(nameless, (time.time() - TEMP_MAX_AGE_S - 5,) * 2)
        fresh = dead.parent / ".tmp-def.part"
        fresh.write_bytes(b"partial")
        make_engine("llama", store_dir=tmp_path / "live")
        make_engine("llama", store_dir=tmp_path)
        assert temp_files(tmp_path) == [fresh, alive]
    finally:
        for p in (killed, live):
            p.kill()
            p.wait()
            p.stdin.close()
            p.stdout.close()


def test_a_read_only_store_without_a_secret_still_serves(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    engine = stored_engine("llama", tmp_path)
    torch.testing.assert_close(first_logits(engine), reference("llama"), rtol=1e-5, atol=1e-5)
    assert engine.disk.write_failures > 0 and not (tmp_path / ".secret").exists()
