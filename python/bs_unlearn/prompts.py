"""How a question (and its answer) becomes token ids for evaluation: open-unlearning's ``preprocess_chat_instance``.

A :class:`PromptFormat` holds open-unlearning's ``template_args`` (its ``configs/model/*.yaml``): with a chat
template, the system prompt and the ``date_string`` passed to it (a fixed date, so that a template that prints
"Today Date" gives the same prompt every day; a template that prints no date ignores it); without one, the tags
around the question. The defaults are open-unlearning's Llama-3.2-Instruct values (chat) and its base-model tags
(plain).

:func:`encode_qa` follows open-unlearning's recipe token for token (docs/math.md, "Evaluation protocol"): the whole
conversation (system, user, assistant) is rendered and tokenised in one piece, the prompt (rendered with the
generation prompt) is tokenised on its own, the answer's labels are every token after the prompt's length, including
whatever the template writes after the answer (its end-of-turn token, and e.g. ChatML's newline), and an eos token is
appended when the conversation does not end with one.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PromptFormat", "encode_prompt", "encode_qa", "prompt_messages"]


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """open-unlearning's ``template_args``.

    Args:
        system_prompt: the system turn's text with a chat template ("" or None: no system turn).
        date_string: passed to the chat template as ``date_string`` (None: not passed, so a template that prints
            the date prints the day's).
        user_start_tag, user_end_tag, asst_start_tag: without a chat template, the prompt is
            ``user_start_tag + question + user_end_tag + asst_start_tag`` (tokenised with the tokenizer's special
            tokens, e.g. bos) and the answer follows it directly.
    """

    system_prompt: str | None = "You are a helpful assistant."
    date_string: str | None = "10 Apr 2025"
    user_start_tag: str = "Question: "
    user_end_tag: str = "\n"
    asst_start_tag: str = "Answer: "

    def __post_init__(self) -> None:
        for name in ("system_prompt", "date_string"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"PromptFormat.{name} must be a str or None, got {type(value).__name__}")
        for name in ("user_start_tag", "user_end_tag", "asst_start_tag"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PromptFormat.{name} must be a str, got {type(getattr(self, name)).__name__}")

    def template_kwargs(self) -> dict:
        """The extra arguments of ``apply_chat_template`` (``date_string`` when set)."""
        return {} if self.date_string is None else {"date_string": self.date_string}


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(question: str, answer: str | None, fmt: PromptFormat) -> list[dict]:
    """The chat: the system turn (when ``fmt`` has a system prompt), the question, the answer when given."""
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def _render(tokenizer, messages: list[dict], fmt: PromptFormat, *, generation_prompt: bool) -> list[int]:
    # What apply_chat_template(tokenize=True) does: render, then tokenise without adding special tokens (the
    # template writes its own).
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **fmt.template_kwargs()
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _plain_prompt(question: str, fmt: PromptFormat) -> str:
    return fmt.user_start_tag + question + fmt.user_end_tag + fmt.asst_start_tag


def encode_prompt(tokenizer, question: str, fmt: PromptFormat = PromptFormat(), *, max_length: int = 512) -> list[int]:
    """The prompt's token ids (where generation starts), as open-unlearning builds them."""
    if _has_chat_template(tokenizer):
        return _render(tokenizer, prompt_messages(question, None, fmt), fmt, generation_prompt=True)
    return list(
        tokenizer(_plain_prompt(question, fmt), add_special_tokens=True, max_length=max_length, truncation=True)[
            "input_ids"
        ]
    )


def encode_qa(
    tokenizer, question: str, answer: str, fmt: PromptFormat = PromptFormat(), *, max_length: int = 512
) -> dict[str, list[int]]:
    """``input_ids`` = the conversation's tokens (+ eos when it does not end with one), ``labels`` = IGNORE_INDEX on
    the prompt's length, the tokens after it. Without a chat template both are cut at ``max_length`` tokens (as
    open-unlearning's tokenizer call does; with one, nothing is cut).

    Raises ValueError when no token is left for the answer (the prompt's tokens cover the conversation's)."""
    from bs_kernels import IGNORE_INDEX  # imported here: the CLI reads PromptFormat before torch is imported

    prompt_ids = encode_prompt(tokenizer, question, fmt, max_length=max_length)
    if _has_chat_template(tokenizer):
        chat_ids = _render(tokenizer, prompt_messages(question, answer, fmt), fmt, generation_prompt=False)
    else:
        text = _plain_prompt(question, fmt) + answer
        chat_ids = list(tokenizer(text, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not chat_ids or chat_ids[-1] != tokenizer.eos_token_id):
        chat_ids.append(int(tokenizer.eos_token_id))
    if len(chat_ids) <= len(prompt_ids):
        raise ValueError(f"no answer token is left after the prompt for question {question[:60]!r}")
    return {"input_ids": chat_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + chat_ids[len(prompt_ids) :]}
