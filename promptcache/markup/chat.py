"""Chat formats: the text a model's chat training put around each role's turn.

PML's `<system>`, `<user>` and `<assistant>` blocks are rendered as `opener + text + suffix`, each
turn independently, so that a role block inside a cached module encodes the same tokens whatever
comes before or after it. `chat_format_for` picks a builtin format by name or model type, or
derives one from a tokenizer's Jinja `chat_template` by rendering probe conversations:

    apply_chat_template([user U1, assistant A1, user U2])
      -> "<s>[INST] " U1 " [/INST]" " " A1 " </s>" "<s>[INST] " U2 " [/INST]"
          user prefix   user suffix  asst prefix asst suffix  user prefix

A derived format also records what the template renders once, before the first turn: its `start`
(e.g. Mistral's BOS) and its `default_system` turn (SmolLM2 and Qwen2.5 add one when a
conversation has no system message). Chats (message lists) are not rendered piece by piece at
all when the format came from a template: `template` is kept and the engine tokenizes them with
`apply_chat_template` itself, so they are exactly what the model was trained on.

A template that puts the system prompt inside the first user turn (Llama 2, Gemma) is expressed
with `user_after_system`: a user turn that directly follows a system turn opens with that
instead of its usual prefix. That is exact for a system turn followed by a user turn, which is
what such templates accept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..errors import PromptCacheError
from .nodes import ROLES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatFormat:
    """How one model family marks chat turns.

    Attributes:
        name: the format's name ("llama2", "chatml", ..., or for one derived from a template
            "derived:<builtin>" when its markers are a builtin's, e.g. "derived:chatml", else
            "derived:<model type>").
        roles: "system"/"user"/"assistant" -> (prefix, suffix) put around the content.
        generation_prompt: opens the assistant's reply; appended after a prompt's last user turn.
        stop: stop strings implied by the format (e.g. "<|im_end|>").
        start: text a conversation starts with, once (e.g. a BOS the template writes). None: the
            tokenizer's own convention (its BOS when it adds one), as for plain text.
        default_system: the whole system turn the template adds when a conversation has none.
        user_after_system: the user turn's opener right after a system turn (templates that merge
            the system prompt into the first user turn); None: the usual prefix.
        template: the Jinja chat template the format was derived from; chats are rendered by it.
    """

    name: str
    roles: Mapping[str, tuple[str, str]] = field(hash=False)
    generation_prompt: str = ""
    stop: tuple[str, ...] = ()
    start: str | None = None
    default_system: str = ""
    user_after_system: str | None = None
    template: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        missing = [r for r in ROLES if r not in self.roles]
        if missing:
            raise PromptCacheError(f"chat format {self.name!r} lacks role(s) {', '.join(missing)}; "
                                   f"a format needs all of {', '.join(ROLES)}")
        object.__setattr__(self, "roles", MappingProxyType({r: tuple(self.roles[r]) for r in ROLES}))
        object.__setattr__(self, "stop", tuple(self.stop))

    def wrap(self, role: str, text: str, after_system: bool = False) -> str:
        """Return `text` as one turn of `role`: opener + text + suffix."""
        return self.opener(role, after_system) + text + self.roles[role][1]

    def opener(self, role: str, after_system: bool = False) -> str:
        """The text that opens a `role` turn; `after_system`: it directly follows a system turn."""
        if role not in self.roles:
            raise PromptCacheError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        if role == "user" and after_system and self.user_after_system is not None:
            return self.user_after_system
        return self.roles[role][0]

    def preamble(self, first_role: str | None) -> str:
        """What the template renders before a conversation whose first turn is `first_role`:
        `start` (if any) and the default system turn unless that turn is a system turn."""
        default = self.default_system if first_role != "system" else ""
        return (self.start or "") + default


# NOTE: Llama-2-chat sees its system prompt *inside* the first instruction,
# "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]", which independent per-role wrappers
# cannot express. We keep the <<SYS>> block verbatim but put it before the first "[INST] " instead
# of just after it: "<s><<SYS>>\n{system}\n<</SYS>>\n\n[INST] {user} [/INST]". Same tokens, one
# marker moved; every [INST] stays well formed and a cached system module is independent of the
# user turn that follows. (A format derived from a Llama 2 template is exact instead: see
# `user_after_system`.)
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
        name: a key of `BUILTIN_FORMATS`; overrides everything else (chats are then rendered by it,
            not by the tokenizer's template).

    Returns:
        The named builtin; else one derived from the tokenizer's chat template; else the builtin
        for the model type ("plain" for unknown types). When the template exists but cannot be
        expressed turn by turn, the builtin still carries it (`template`): chats are rendered by
        the template, PML role blocks by the builtin.

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
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return fallback
    derived = derive_chat_format(tokenizer, f"derived:{model_type or 'unknown'}")
    if derived is not None:
        return replace(derived, name=f"derived:{_family(derived) or model_type or 'unknown'}")
    if not _renders(tokenizer):
        logger.warning("the tokenizer's chat template fails on a plain conversation; using %r", fallback.name)
        return fallback
    logger.warning("the tokenizer's chat template cannot be expressed turn by turn: chats use the template, "
                   "PML role blocks the builtin format %r", fallback.name)
    return replace(fallback, name=f"{fallback.name}+template", template=template)


def _family(fmt: ChatFormat) -> str | None:
    """The builtin format whose role markers a derived one has (SmolLM2's llama-type template is ChatML)."""
    for name, builtin in BUILTIN_FORMATS.items():
        if name != "plain" and dict(fmt.roles) == dict(builtin.roles) \
                and fmt.generation_prompt == builtin.generation_prompt:
            return name
    return None


def render_messages(fmt: ChatFormat, messages: Sequence[Mapping[str, str]],
                    add_generation_prompt: bool = True) -> str:
    """Render chat `messages` ({"role": ..., "content": ...}) turn by turn in `fmt`.

    The text starts with `fmt.preamble` (a BOS the tokenizer adds itself is not included). For a
    derived format it equals `apply_chat_template(messages, tokenize=False)` on the probes the
    derivation checked. Like `apply_chat_template`, the generation prompt is appended whenever
    asked for.
    """
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise PromptCacheError(f"message {i} needs 'role' and 'content' keys; got {sorted(message)}")
    parts = [fmt.preamble(messages[0]["role"] if messages else None)]
    after_system = False
    for message in messages:
        parts.append(fmt.wrap(message["role"], message["content"], after_system))
        after_system = message["role"] == "system"
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


def _renders(tokenizer: Any) -> bool:
    try:
        _render(tokenizer, [("user", "hello")], add_generation_prompt=True)
        return True
    except Exception:  # noqa: BLE001 - any template failure
        return False


def _split(text: str, sentinels: Sequence[str]) -> list[str]:
    """The pieces of `text` around each sentinel, in order; ValueError if one is missing."""
    pieces, rest = [], text
    for s in sentinels:
        if rest.count(s) != 1:
            raise ValueError(f"sentinel {s} rendered {rest.count(s)} times")
        before, rest = rest.split(s)
        pieces.append(before)
    return pieces + [rest]


def derive_chat_format(tokenizer: Any, name: str) -> ChatFormat | None:
    """Derive per-role wrappers from `tokenizer.chat_template`.

    Returns None when the template cannot be expressed turn by turn: its pieces are inconsistent,
    or the derived format does not re-render the probe conversations exactly.
    """
    try:
        fmt = _derive(tokenizer, name)
    except Exception as exc:  # noqa: BLE001 - any template failure means "cannot derive"
        logger.debug("chat template derivation failed: %s", exc)
        return None
    if fmt is not None and not _round_trips(tokenizer, fmt):
        logger.debug("derived chat format %s does not re-render the template's probes", name)
        return None
    return fmt


def _derive(tokenizer: Any, name: str) -> ChatFormat | None:
    ua, aa, ub, ab, uc = _S[1:]
    conv = [("user", ua), ("assistant", aa), ("user", ub), ("assistant", ab), ("user", uc)]
    s0, s1, s2, s3, s4, s5 = _split(_render(tokenizer, conv), [ua, aa, ub, ab, uc])
    user_suffix = s5
    if s1 != s3 or s2 != s4 or not s1.startswith(user_suffix):
        return None
    assistant_prefix = s1[len(user_suffix):]
    # The text after a conversation's final reply is the assistant suffix; the rest of the gap
    # between a reply and the next user turn is the user prefix (BOS included, if the template
    # writes one there: Llama 2's "<s>[INST] ").
    _, _, assistant_suffix = _split(_render(tokenizer, conv[:2]), [ua, aa])
    if not s2.startswith(assistant_suffix) or not s0.endswith(s2[len(assistant_suffix):]):
        return None
    user_prefix = s2[len(assistant_suffix):]
    plain = _render(tokenizer, conv[:1])
    prompted = _render(tokenizer, conv[:1], add_generation_prompt=True)
    if not prompted.startswith(plain):
        return None
    user = (user_prefix, user_suffix)
    pre = s0[: len(s0) - len(user_prefix)]  # start + default system turn, if any
    system, start, default_system, after_system = _derive_system(tokenizer, pre, user)
    roles = {"user": user, "assistant": (assistant_prefix, assistant_suffix), "system": system}
    return ChatFormat(name, roles, prompted[len(plain):], _stop_strings(tokenizer, assistant_suffix),
                      start=start, default_system=default_system, user_after_system=after_system,
                      template=tokenizer.chat_template)


def _start_of(tokenizer: Any, pre: str, user_prefix: str) -> str:
    """The BOS the template writes once at the start: only when a turn does not open with it."""
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and pre.startswith(bos) and not user_prefix.startswith(bos):
        return bos
    return ""


def _derive_system(tokenizer: Any, pre: str, user: tuple[str, str]):
    """(system wrapper, start, default system turn, user_after_system) from the template."""
    user_prefix, user_suffix = user
    start = _start_of(tokenizer, pre, user_prefix)
    sys_s, ua = _S[0], _S[1]
    try:
        a, b, c = _split(_render(tokenizer, [("system", sys_s), ("user", ua)]), [sys_s, ua])
    except Exception as exc:  # noqa: BLE001 - templates reject system messages by raising anything
        # NOTE: a template without a system role gets system text as a user turn.
        logger.debug("chat template rejects a system message (%s); system turns use the user wrapper", exc)
        return user, pre, "", None
    if c != user_suffix or not a.startswith(start):
        raise ValueError("the user turn after a system message renders differently")
    opener = a[len(start):]
    if b.endswith(user_prefix):  # a turn of its own
        system, after_system = (opener, b[: len(b) - len(user_prefix)]), None
    elif user_prefix and opener.startswith(user_prefix):
        # Merged into the first user turn (Llama 2, Gemma): the system block opens that turn.
        system, after_system = (opener, b), ""
    else:
        raise ValueError("cannot place the system message relative to the user turn")
    rest = pre[len(start):]
    if rest and after_system is None and rest.startswith(system[0]) and rest.endswith(system[1]) \
            and len(rest) >= len(system[0]) + len(system[1]):
        return system, start, rest, after_system
    return system, pre, "", after_system  # anything else before the first turn is start text


def _round_trips(tokenizer: Any, fmt: ChatFormat) -> bool:
    """Whether `fmt` renders probe conversations exactly as the template does."""
    probes = [[("user", "Hi")], [("user", "Hi"), ("assistant", "Yes."), ("user", "Why?")]]
    if fmt.roles["system"] != fmt.roles["user"]:
        probes += [[("system", "Be brief."), ("user", "Hi"), ("assistant", "Yes."), ("user", "Why?")]]
    for turns in probes:
        messages = [{"role": r, "content": c} for r, c in turns]
        for gen in (False, True):
            if render_messages(fmt, messages, gen) != _render(tokenizer, turns, gen):
                return False
    return True


def _stop_strings(tokenizer: Any, assistant_suffix: str) -> tuple[str, ...]:
    """The assistant suffix minus whitespace and BOS/EOS (the engine stops on EOS ids itself)."""
    stop = assistant_suffix
    for special in (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)):
        if special:
            stop = stop.replace(special, "")
    stop = stop.strip()
    return (stop,) if stop else ()
