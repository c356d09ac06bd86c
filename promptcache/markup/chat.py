"""Chat formats: the text a model's chat training put around each role's turn.

PML's `<system>`, `<user>` and `<assistant>` blocks are rendered as `prefix + text + suffix`, each
role independently, so that a role block inside a cached module encodes the same tokens whatever
comes before or after it. `chat_format_for` picks a builtin format by name or model type, or
derives one from a tokenizer's Jinja `chat_template` by rendering probe conversations:

    apply_chat_template([user U1, assistant A1, user U2])
      -> "<s>[INST] " U1 " [/INST] " A1 " </s><s>[INST] " U2 " [/INST]"
          user prefix   user suffix|asst prefix  asst suffix|user prefix

The BOS token is never part of a prefix: the layout compiler adds it at the start of a schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import PromptCacheError
from .nodes import ROLES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatFormat:
    """How one model family marks chat turns.

    Attributes:
        name: the format's name ("llama2", "chatml", ..., or "derived:<model type>").
        roles: "system"/"user"/"assistant" -> (prefix, suffix) put around the content.
        generation_prompt: opens the assistant's reply; appended after a prompt's last user turn.
        stop: stop strings implied by the format (e.g. "<|im_end|>").
    """

    name: str
    roles: Mapping[str, tuple[str, str]] = field(hash=False)
    generation_prompt: str = ""
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise PromptCacheError(f"chat format {self.name!r} lacks role(s) {', '.join(missing)}; "
                                   f"a format needs all of {', '.join(ROLES)}")
        object.__setattr__(self, "roles", MappingProxyType({r: tuple(self.roles[r]) for r in ROLES}))
        object.__setattr__(self, "stop", tuple(self.stop))

    def wrap(self, role: str, text: str) -> str:
        """Return `text` as one turn of `role`: prefix + text + suffix."""
        if role not in self.roles:
            raise PromptCacheError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        prefix, suffix = self.roles[role]
        return prefix + text + suffix


# NOTE: Llama-2-chat sees its system prompt *inside* the first instruction,
# "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", which independent per-role wrappers
# cannot express. We keep the <<SYS>> block verbatim but put it before the first "[INST] " instead
# of just after it: "<s><<SYS>>\n{system}\n<</SYS>>\n\n[INST] {user} [/INST]". Same tokens, one
# marker moved; every [INST] stays well formed and a cached system module is independent of the
# user turn that follows. (The alternative, closing the system block with its own " [/INST]", would
# show the model an instruction turn without a reply.)
_LLAMA2 = ChatFormat(
    name="llama2",
    roles={
        "system": ("<<SYS>>\n", "\n<</SYS>>\n\n"),
        "user": ("[INST] ", " [/INST]"),
        # The reply closes with EOS and the next turn opens with BOS, as in Meta's chat code.
        "assistant": (" ", " </s><s>"),
    },
    generation_prompt="",
)

_FALCON = ChatFormat(
    name="falcon",
    roles={"system": ("System: ", "\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", "\n")},
    generation_prompt="Assistant:",
    stop=("\nUser:", "\nSystem:"),
)

_CHATML = ChatFormat(
    name="chatml",
    roles={r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ROLES},
    generation_prompt="<|im_start|>assistant\n",
    stop=("<|im_end|>",),
)

_PLAIN = ChatFormat(
    name="plain",
    roles={"system": ("", "\n\n"), "user": ("", "\n"), "assistant": ("", "\n")},
    generation_prompt="",
)

BUILTIN_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (_LLAMA2, _FALCON, _CHATML, _PLAIN)}

_BY_MODEL_TYPE = {
    "llama": "llama2", "mistral": "llama2", "falcon": "falcon", "mpt": "chatml", "qwen2": "chatml",
}


def chat_format_for(tokenizer: Any, model_config: Any = None, name: str | None = None) -> ChatFormat:
    """Choose the chat format for a model.

    Args:
        tokenizer: the model's tokenizer; its `chat_template`, if any, is used.
        model_config: the model's config; its `model_type` picks a builtin when there is no template.
        name: a key of `BUILTIN_FORMATS`; overrides everything else.

    Returns:
        The named builtin; else one derived from the tokenizer's chat template; else the builtin
        for the model type ("plain" for unknown types, or when the derivation fails).

    Raises:
        PromptCacheError: `name` is not a builtin format.
    """
    if name is not None:
        if name not in BUILTIN_FORMATS:
            raise PromptCacheError(f"unknown chat format {name!r}; "
                                   f"builtin formats: {', '.join(BUILTIN_FORMATS)}")
        return BUILTIN_FORMATS[name]
    model_type = getattr(model_config, "model_type", None) or ""
    fallback = BUILTIN_FORMATS[_BY_MODEL_TYPE.get(model_type, "plain")]
    if getattr(tokenizer, "chat_template", None):
        derived = derive_chat_format(tokenizer, f"derived:{model_type or 'unknown'}")
        if derived is not None:
            return derived
        logger.warning("could not derive a chat format from the tokenizer's chat template; using %r",
                       fallback.name)
    return fallback


def render_messages(fmt: ChatFormat, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
    """Render chat `messages` ({"role": ..., "content": ...}) in `fmt`, without BOS.

    Like `apply_chat_template`, the generation prompt is appended whenever asked for.
    """
    parts = []
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise PromptCacheError(f"message {i} needs 'role' and 'content' keys; got {sorted(message)}")
        parts.append(fmt.wrap(message["role"], message["content"]))
    if add_generation_prompt:
        parts.append(fmt.generation_prompt)
    return "".join(parts)


# ---- deriving a format from a Jinja chat template --------------------------------------------

_S = ("PCSENTINELSYS", "PCSENTINELUA", "PCSENTINELAA", "PCSENTINELUB", "PCSENTINELAB", "PCSENTINELUC")


def _render(tokenizer: Any, turns: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, not str")
    return out


def _split(text: str, sentinels: Sequence[str]) -> list[str]:
    """The pieces of `text` around each sentinel, in order; ValueError if one is missing."""
    pieces, rest = [], text
    for s in sentinels:
        if rest.count(s) != 1:
            raise ValueError(f"sentinel {s} rendered {rest.count(s)} times")
        before, rest = rest.split(s)
        pieces.append(before)
    return pieces + [rest]


def _strip_bos(text: str, bos: str | None) -> str:
    return text[len(bos):] if bos and text.startswith(bos) else text


def derive_chat_format(tokenizer: Any, name: str) -> ChatFormat | None:
    """Derive per-role wrappers from `tokenizer.chat_template`; None if they are inconsistent."""
    try:
        return _derive(tokenizer, name)
    except Exception as exc:  # noqa: BLE001 - any template failure means "cannot derive"
        logger.debug("chat template derivation failed: %s", exc)
        return None


def _derive(tokenizer: Any, name: str) -> ChatFormat | None:
    bos = getattr(tokenizer, "bos_token", None)
    ua, aa, ub, ab, uc = _S[1:]
    conv = [("user", ua), ("assistant", aa), ("user", ub), ("assistant", ab), ("user", uc)]
    s0, s1, s2, s3, s4, s5 = _split(_render(tokenizer, conv), [ua, aa, ub, ab, uc])
    user_suffix = s5
    if s1 != s3 or s2 != s4 or not s1.startswith(user_suffix):
        return None
    assistant_prefix = s1[len(user_suffix):]
    # The text after a conversation's final reply is the assistant suffix...
    _, _, after_reply = _split(_render(tokenizer, conv[:2]), [ua, aa])
    if not s2.startswith(after_reply):
        return None
    # ...and the rest of the gap between a reply and the next user turn is the user prefix. A BOS
    # there (Llama 2: " </s><s>[INST] ") stays with the reply's suffix: the compiler adds the first BOS.
    user_prefix = _strip_bos(s2[len(after_reply):], bos)
    assistant_suffix = s2[: len(s2) - len(user_prefix)]
    if not _strip_bos(s0, bos).endswith(user_prefix):
        return None  # NOTE: a preamble before the prefix (e.g. a default system prompt) is dropped.
    plain = _render(tokenizer, conv[:1])
    prompted = _render(tokenizer, conv[:1], add_generation_prompt=True)
    if not prompted.startswith(plain):
        return None
    roles = {"user": (user_prefix, user_suffix), "assistant": (assistant_prefix, assistant_suffix)}
    roles["system"] = _derive_system(tokenizer, bos, roles["user"])
    stop = _stop_strings(tokenizer, assistant_suffix)
    return ChatFormat(name, roles, prompted[len(plain):], stop)


def _derive_system(tokenizer: Any, bos: str | None, user: tuple[str, str]) -> tuple[str, str]:
    """The system wrapper: a turn of its own, or (Llama 2, Gemma) moved out of the first user turn."""
    user_prefix, user_suffix = user
    sys_s, ua = _S[0], _S[1]
    try:
        a, b, c = _split(_render(tokenizer, [("system", sys_s), ("user", ua)]), [sys_s, ua])
    except Exception as exc:  # noqa: BLE001 - templates reject system messages by raising anything
        # NOTE: a template without a system role gets system text as a user turn.
        logger.debug("chat template rejects a system message (%s); system turns use the user wrapper", exc)
        return user
    a = _strip_bos(a, bos)
    if c != user_suffix:
        raise ValueError("the user turn after a system message renders differently")
    if b.endswith(user_prefix) and user_prefix:
        return a, b[: len(b) - len(user_prefix)]
    if a.startswith(user_prefix):
        # Merged into the first user turn (see the Llama 2 NOTE above BUILTIN_FORMATS): keep the
        # system block's own markers and let the user turn's prefix follow it.
        return a[len(user_prefix):], b
    raise ValueError("cannot place the system message relative to the user turn")


def _stop_strings(tokenizer: Any, assistant_suffix: str) -> tuple[str, ...]:
    """The assistant suffix minus whitespace and BOS/EOS (the engine stops on EOS ids itself)."""
    stop = assistant_suffix
    for special in (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)):
        if special:
            stop = stop.replace(special, "")
    stop = stop.strip()
    return (stop,) if stop else ()
