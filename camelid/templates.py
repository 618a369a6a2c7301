"""Chat templates: one object renders a conversation for training (text + loss mask) and for inference (prompt +
stop tokens), so a fine-tuned model is trained on exactly the prompt it will see and learns to stop where the
server stops it.

Messages are OpenAI-style dicts {"role": "system" | "user" | "assistant" | "tool", "content": str}.
Special tokens are rendered as text ("<|eot_id|>", "<s>") and the text is encoded with bos=False, as
transformers' apply_chat_template + tokenize does. `from_jinja` runs a model's own `chat_template` instead.

Loss mask: a template renders a conversation as character spans, the trained ones being each assistant answer
plus the end-of-turn token after it. The whole text is encoded once, and each span boundary is mapped to a token
index by encoding the text up to it: the tokens before an answer are then exactly what `encode_prompt` returns
at inference, and the mask boundary is exact. (Should a token straddle a boundary, which no built-in format
does with the real Llama 2 / 3 and Mistral tokenizers in the tests, it is trained at an answer's start, not at
its end.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, Sequence

IGNORE_INDEX = -100  # the label of tokens not predicted (PyTorch's convention; train.loss uses this one)
Message = dict[str, Any]


class TemplateError(ValueError):
    """A conversation the template cannot render, or a template that does not fit the tokenizer."""


class _Tokenizer(Protocol):  # what the templates use of camelid.Tokenizer (templates import nothing of camelid)
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, i: int) -> str | None: ...


def _token(tokenizer: _Tokenizer, i: int | None) -> str:
    return (tokenizer.id_to_token(i) or "") if i is not None else ""


class _Base:
    """Training / inference encoding shared by the built-in and the Jinja templates."""

    name: str

    def _spans(self, messages: Sequence[Message], add_generation_prompt: bool, bos: str,
               eos: str) -> tuple[str, list[tuple[int, int]]]:
        """(rendered text, [(start, end) character spans of the trained text])."""
        raise NotImplementedError

    def special_tokens(self, tokenizer: _Tokenizer) -> tuple[str, str]:
        """(bos, eos) token strings, as Jinja templates see them."""
        return _token(tokenizer, tokenizer.bos_id), _token(tokenizer, tokenizer.eos_id)

    def check(self, tokenizer: _Tokenizer) -> None:
        """Raise TemplateError when the tokenizer lacks a special token this template writes."""

    def encode_for_training(self, tokenizer: _Tokenizer, messages: Sequence[Message], train_on_all: bool = False,
                            max_len: int | None = None) -> tuple[list[int], list[int] | None]:
        """(input_ids, labels): labels are -100 except on assistant answers and the end-of-turn token after each
        (every token with `train_on_all`). Labels are aligned with the ids, not shifted. Labels are None when
        there are more than max_len ids: the caller is about to shorten the conversation, skip the mask work."""
        self.check(tokenizer)
        text, spans = self._spans(messages, False, *self.special_tokens(tokenizer))
        ids = tokenizer.encode(text, bos=False)
        if max_len is not None and len(ids) > max_len:
            return ids, None
        if train_on_all:
            return ids, list(ids)
        bounds = sorted({b for span in spans for b in span})
        at = {}
        for b, prefix in zip(bounds, tokenizer.encode_batch([text[:b] for b in bounds], bos=False)):
            n = len(prefix)  # tokens of text[:b] that are also the first tokens of the whole text
            if ids[:n] != prefix:  # a token straddles the boundary: stop before it
                n = next((k for k, (a, c) in enumerate(zip(prefix, ids)) if a != c), min(n, len(ids)))
            at[b] = n
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[at[start]:at[end]] = ids[at[start]:at[end]]
        return ids, labels

    def encode_prompt(self, tokenizer: _Tokenizer, messages: Sequence[Message]) -> list[int]:
        """Token ids of the conversation so far + the assistant header: what generation continues."""
        self.check(tokenizer)
        return tokenizer.encode(self.render(messages, True, *self.special_tokens(tokenizer)), bos=False)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               bos_token: str | None = None, eos_token: str | None = None) -> str:
        raise NotImplementedError

    @property
    def stop_strings(self) -> tuple[str, ...]:
        raise NotImplementedError

    def stop_token_ids(self, tokenizer: _Tokenizer) -> list[int]:
        """Ids generation stops on: the stop strings that are single tokens, and the tokenizer's EOS."""
        eos = self.special_tokens(tokenizer)[1]
        names = [s.replace("{eos}", eos) for s in self.stop_strings]
        ids = [i for s in names if s and (i := tokenizer.token_to_id(s)) is not None]
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        return sorted(set(ids))


@dataclass(frozen=True)
class ChatTemplate(_Base):
    """A chat format written as string pieces. "{content}" is the message text; "{bos}" / "{eos}" are the
    tokenizer's BOS / EOS text (or bos_token / eos_token when rendering without a tokenizer)."""

    name: str
    user: str
    assistant: str  # the header before an answer: what an inference prompt ends with
    answer: str = "{content}"  # the trained text of an answer (with any spacing the format puts around it)
    end_of_turn: str = "{eos}"  # trained after every answer, so the model learns to stop
    separator: str = ""  # after end_of_turn, not trained ("\n" in ChatML)
    prefix: str = ""  # once, at the start
    system: str | None = None  # a native system turn; None: the system prompt is folded into the first user turn
    fold: str = "{system}\n\n{content}"
    fold_then_strip: bool = False  # Llama 2 strips the folded text as a whole; Gemma strips the message only
    tool: str | None = None  # a tool-result turn; None: rendered as a user turn
    default_system: str | None = None  # used when the conversation has no system message
    strip: bool = False  # strip each message's content, as the reference template does
    stops: tuple[str, ...] = ()  # stop strings besides end_of_turn
    bos_token: str = "<s>"  # rendered when no tokenizer is given
    eos_token: str = "</s>"

    @property
    def specials(self) -> tuple[str, ...]:
        """The special tokens the format writes literally (not through {bos} / {eos})."""
        pieces = (self.user, self.assistant, self.end_of_turn, self.prefix, self.system or "", self.tool or "")
        known = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
                 "<|im_end|>", "<start_of_turn>", "<end_of_turn>")
        return tuple(t for t in known if any(t in p for p in pieces))

    def check(self, tokenizer: _Tokenizer) -> None:
        missing = [t for t in self.specials if tokenizer.token_to_id(t) is None]
        if missing:
            raise TemplateError(f"template {self.name!r} writes {', '.join(missing)}, which the tokenizer does not "
                                "have as tokens: pick the template that matches the model")
        if "{eos}" in self.end_of_turn and tokenizer.eos_id is None:
            raise TemplateError(f"template {self.name!r} ends answers with EOS, but the tokenizer has no EOS token")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.end_of_turn, *self.stops)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               bos_token: str | None = None, eos_token: str | None = None) -> str:
        bos = self.bos_token if bos_token is None else bos_token
        eos = self.eos_token if eos_token is None else eos_token
        return self._spans(messages, add_generation_prompt, bos, eos)[0]

    def _spans(self, messages, add_generation_prompt, bos, eos):
        def fill(fmt: str, content: str = "", system: str = "") -> str:
            # one pass, so a message that itself contains "{eos}" or "{content}" stays as written
            values = {"bos": bos, "eos": eos, "content": content, "system": system}
            return _SLOT.sub(lambda m: values[m.group(1)], fmt)

        def clean(text: str) -> str:
            return text.strip() if self.strip else text

        messages = list(messages)
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        pending = system if self.system is None else None  # waits for the first user turn
        if pending is not None and not any(m["role"] == "user" for m in messages):
            raise TemplateError(f"template {self.name!r} puts the system prompt in the first user turn, "
                                "but the conversation has no user turn")
        text, spans = fill(self.prefix), []
        if system is not None and self.system is not None:
            text += fill(self.system, clean(system))
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if not isinstance(content, str):
                raise TemplateError(f"message {i}: content must be a string, got {type(content).__name__}")
            if role == "assistant":
                text += fill(self.assistant)
                start = len(text)
                text += fill(self.answer, clean(content)) + fill(self.end_of_turn)
                spans.append((start, len(text)))
                text += fill(self.separator)
            elif role in ("user", "tool"):
                if role == "user" and pending is not None:
                    if self.fold_then_strip:
                        content = clean(fill(self.fold, content, pending))
                    else:
                        content = fill(self.fold, clean(content), clean(pending))
                    pending = None
                else:
                    content = clean(content)
                text += fill(self.tool if role == "tool" and self.tool else self.user, content)
            else:
                raise TemplateError(f"message {i}: role {role!r} is not one of system (first only), user, "
                                    "assistant, tool")
        if add_generation_prompt:
            text += fill(self.assistant)
        return text, spans


_SLOT = re.compile(r"\{(bos|eos|content|system)\}")
_LLAMA3 = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
_CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"

TEMPLATES: dict[str, ChatTemplate] = {
    # meta-llama/Llama-2-*-chat: BOS before every [INST]; the system prompt lives inside the first one
    "llama2": ChatTemplate("llama2", user="{bos}[INST] {content} [/INST]", assistant="", answer=" {content} ",
                           fold="<<SYS>>\n{system}\n<</SYS>>\n\n{content}", fold_then_strip=True, strip=True),
    # meta-llama/Meta-Llama-3-*-Instruct; tool results use the "ipython" role as in Llama 3.1
    "llama3": ChatTemplate("llama3", prefix="{bos}", system=_LLAMA3.replace("{role}", "system"),
                           user=_LLAMA3.replace("{role}", "user"), tool=_LLAMA3.replace("{role}", "ipython"),
                           assistant="<|start_header_id|>assistant<|end_header_id|>\n\n", end_of_turn="<|eot_id|>",
                           strip=True, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
    "chatml": ChatTemplate("chatml", system=_CHATML.replace("{role}", "system"), user=_CHATML.replace("{role}", "user"),
                           tool=_CHATML.replace("{role}", "tool"), assistant="<|im_start|>assistant\n",
                           end_of_turn="<|im_end|>", separator="\n", bos_token="", eos_token="<|im_end|>"),
    # mistralai/Mistral-7B-Instruct-v0.1/v0.2: no system role, so it is folded into the first [INST]
    "mistral": ChatTemplate("mistral", prefix="{bos}", user="[INST] {content} [/INST]", assistant=""),
    # FastChat's vicuna_v1.1 ("ADD_COLON_TWO": sep " ", sep2 EOS)
    "vicuna": ChatTemplate("vicuna", prefix="{bos}", system="{content} ", user="USER: {content} ",
                           assistant="ASSISTANT:", answer=" {content}", stops=("USER:",),
                           default_system="A chat between a curious user and an artificial intelligence assistant. "
                           "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    # Stanford Alpaca; later turns repeat the Instruction / Response pair
    "alpaca": ChatTemplate("alpaca", prefix="{bos}", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
                           assistant="### Response:\n", separator="\n\n", stops=("### Instruction:",),
                           default_system="Below is an instruction that describes a task. "
                           "Write a response that appropriately completes the request."),
    # google/gemma-*-it: the assistant is "model"; no system role (Gemma 2/3 fold it into the first user turn)
    "gemma": ChatTemplate("gemma", prefix="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n",
                          assistant="<start_of_turn>model\n", end_of_turn="<end_of_turn>", separator="\n", strip=True,
                          bos_token="<bos>", eos_token="<eos>"),
}
TEMPLATES["vicuna_v1.1"] = TEMPLATES["vicuna"]
# Qwen 1.5 / 2 / 2.5: ChatML with a default system prompt
TEMPLATES["qwen"] = replace(TEMPLATES["chatml"], name="qwen", default_system="You are a helpful assistant.")


TEMPLATE_FILE = "camelid_template.json"  # {"template": NAME} in a fine-tuned folder; NAME "model" = the tokenizer's own


def recorded_template(folder: str | Path) -> str | None:
    """The template name a fine-tuning run recorded in its final folder ("model" = the tokenizer's own), or None."""
    file = Path(folder) / TEMPLATE_FILE
    if not file.is_file():
        return None
    try:
        name = json.loads(file.read_text(encoding="utf-8")).get("template")
    except (ValueError, AttributeError):  # not JSON, not UTF-8, or not an object
        name = None
    if not isinstance(name, str):
        raise TemplateError(f'{file}: expected {{"template": NAME}}; write it again or delete it')
    return name


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise TemplateError(f"unknown chat template {name!r}: choose one of {', '.join(sorted(TEMPLATES))}, "
                            "or use the model's own (from_jinja / for_tokenizer)")
    return TEMPLATES[name]


# ---- a model's own Jinja chat_template ---------------------------------------------------------------------------

# End-of-turn markers looked for in a Jinja template: training stops after the last one inside an answer, so a
# separator the template writes after it ("\n" in ChatML) is context, not target.
_END_MARKERS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>",
                "<eos>")


def _jinja_env():
    """The environment transformers' apply_chat_template renders in (utils/chat_template_utils.py): sandboxed,
    trim_blocks + lstrip_blocks, loopcontrols, a tojson that does not escape HTML, raise_exception, strftime_now.
    `{% generation %}` blocks (assistant masks in transformers) render their body."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("rendering a model's chat_template needs jinja2: pip install 'jinja2>=3.1.6' "
                          "(or use a built-in template by name)") from None
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # chat templates come from the Hub: untrusted code; older releases have known sandbox escapes
        raise ImportError(f"jinja2 {jinja2.__version__} is too old for untrusted chat templates: "
                          "pip install -U 'jinja2>=3.1.6'")

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        @staticmethod
        def _body(caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class JinjaTemplate(_Base):
    """A model's `chat_template`, rendered as transformers renders it. The trained span of answer i is found by
    rendering the conversation up to it: render(messages[:i], add_generation_prompt=True) must be a prefix of the
    whole rendering; the answer runs from there to where render(messages[:i+1]) stops agreeing with it, cut
    after the last end-of-turn marker inside."""

    def __init__(self, template: str, bos_token: str | None = None, eos_token: str | None = None,
                 name: str = "jinja", **extra: Any) -> None:
        env = _jinja_env()  # first: it says how to install jinja2 when it is missing
        import jinja2

        self.name, self.source = name, template
        self.bos_token, self.eos_token, self.extra = bos_token or "", eos_token or "", extra
        try:
            self._compiled = env.from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{name}: the chat template is not valid Jinja ({e.message}, line {e.lineno})") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False,
               bos_token: str | None = None, eos_token: str | None = None) -> str:
        import jinja2  # imported by _jinja_env already

        bos = self.bos_token if bos_token is None else bos_token
        eos = self.eos_token if eos_token is None else eos_token
        try:
            return self._compiled.render(messages=list(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos,
                                         **self.extra)
        except jinja2.TemplateError as e:  # raise_exception in the template, an undefined value, a sandbox refusal
            raise TemplateError(f"{self.name}: the chat template failed on this conversation: {e}") from None

    def check(self, tokenizer: _Tokenizer) -> None:
        missing = [m for m in self.stop_strings[1:] if tokenizer.token_to_id(m) is None]
        if missing:
            raise TemplateError(f"{self.name}: the chat template ends turns with {', '.join(missing)}, which the "
                                "tokenizer does not have as a token: is it this model's tokenizer?")

    def special_tokens(self, tokenizer: _Tokenizer) -> tuple[str, str]:
        """(bos, eos) token strings, as Jinja templates see them."""
        bos, eos = super().special_tokens(tokenizer)
        return bos or self.bos_token, eos or self.eos_token

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(["{eos}", *(m for m in _END_MARKERS if m in self.source)]))

    def _spans(self, messages, add_generation_prompt, bos, eos):
        messages = list(messages)
        text = self.render(messages, add_generation_prompt, bos, eos)
        markers = [m for m in (eos, *_END_MARKERS) if m and (m in self.source or m == eos)]
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True, bos, eos)
            if not text.startswith(prompt):
                raise TemplateError(f"{self.name}: the prompt before answer {i} is not a prefix of the whole "
                                    "conversation's rendering: this template cannot be masked turn by turn")
            upto = self.render(messages[:i + 1], False, bos, eos)
            end = len(prompt)
            while end < min(len(upto), len(text)) and upto[end] == text[end]:
                end += 1
            answer = text[len(prompt):end]
            cut = max((answer.rfind(k) + len(k) for k in markers if k in answer), default=len(answer))
            spans.append((len(prompt), len(prompt) + cut))
        return text, spans


def from_jinja(template: str, bos_token: str | None = None, eos_token: str | None = None,
               **extra: Any) -> JinjaTemplate:
    """A template object over a model's Jinja `chat_template` (tokenizer_config.json or chat_template.jinja)."""
    return JinjaTemplate(template, bos_token, eos_token, **extra)


def for_tokenizer(tokenizer: Any, name: str | None = None) -> _Base:
    """The named built-in template, or else the tokenizer's own chat_template."""
    if name is not None:
        return get_template(name)
    if getattr(tokenizer, "chat_template", None):
        return from_jinja(tokenizer.chat_template, *(_token(tokenizer, i) for i in (tokenizer.bos_id,
                                                                                      tokenizer.eos_id)))
    raise TemplateError("the tokenizer has no chat_template: name one of " + ", ".join(sorted(TEMPLATES)))
