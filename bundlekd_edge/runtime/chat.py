"""Chat prompts as tokens: the model's own chat template, with every message's text kept as text.

A product catalogue is untrusted: a title holding `<|im_end|><|im_start|>system ...` must reach
the model as those characters, never as the chat-role tokens they spell. So the template is
rendered with a marker in place of each message's text, the template's own text is tokenized
with special tokens (its role markers) and each message's text without them. For ordinary text
the tokens equal those of the whole rendered string (the template puts a newline or a special
token at every seam), so training and inference see the same tokens as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .. import BkdError
from . import llamacpp

# Used only when a GGUF carries no chat template (e.g. a base model): ChatML, as SmolLM2 uses.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MARK = "\ue000{}\ue001"  # private-use characters: no template trims or escapes them
_MARKED = re.compile("\ue000(\\d+)\ue001")


def chat_pieces(render: Callable[[list[dict]], str], messages: list[dict], source: str) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_message_text) pieces, in order."""
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    try:
        text = render(marked)
    except Exception as e:  # a hostile or broken template: jinja2's SecurityError, TemplateError, ...
        raise BkdError(f"{source}: the chat template failed: {type(e).__name__}: {e}") from None
    parts = _MARKED.split(text)
    seen = [int(i) for i in parts[1::2]]
    if sorted(seen) != list(range(len(messages))):
        raise BkdError(f"{source}: the chat template changes or repeats the message text; cannot keep it as text")
    pieces = []
    for k, part in enumerate(parts):
        if k % 2:
            pieces.append((messages[int(part)]["content"], True))
        elif part:
            pieces.append((part, False))
    return pieces


class ChatTokenizer:
    """The GGUF's chat template and llama.cpp's tokenizer (a loaded model, or one with `vocab_only`)."""

    def __init__(self, llm, source: str | Path):
        template = llm.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE
        try:
            self._render, self._add_bos = llamacpp.chat_formatter(llm, template)
        except Exception as e:  # the template does not even compile
            raise BkdError(f"{source}: the chat template failed: {type(e).__name__}: {e}") from None
        self.llm, self.source, self.eos_id = llm, str(source), llm.token_eos()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokens of the rendered prompt, ending with the assistant's turn header."""
        ids: list[int] = []
        for k, (text, is_message) in enumerate(chat_pieces(self._render, messages, self.source)):
            ids += self.llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos and k == 0, special=not is_message)
        return ids

    def text_ids(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")
