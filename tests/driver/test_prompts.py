"""prompts.encode_qa / encode_prompt: open-unlearning's preprocess_chat_instance token for token, on tiny tokenizers."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from bs_unlearn.prompts import PromptFormat, encode_prompt, encode_qa  # noqa: E402
from driver_fixtures import build_tokenizer  # noqa: E402

IGNORE = -100


def _chat_tokenizer(template: str):
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[END]", "[USER]", "[BOT]", "[SYS]"]})
    tokenizer.chat_template = template
    return tokenizer


# ChatML-like: every turn ends with [END] and a word after it (as ChatML writes "<|im_end|>\n"); a system turn and
# the date when the caller passes one, else "item9" (a template that falls back to the day's date).
DATED = (
    "{% if not date_string is defined %}{% set date_string = 'item9' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ date_string }} {{ m['content'] }} [END] "
    "{% elif m['role'] == 'user' %}[USER] {{ m['content'] }} [END] "
    "{% else %}[BOT] {{ m['content'] }} [END] item0 {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[BOT] {% endif %}"
)
UNDATED = (
    "{% for m in messages %}[USER] {{ m['content'] }} [END] {% endfor %}{% if add_generation_prompt %}[BOT] {% endif %}"
)
# Writes no assistant turn at all.
NO_ANSWER = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[USER] {{ m['content'] }} [END] {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[BOT] {% endif %}"
)
QUESTION = "what is it ?"


def test_labels_are_everything_after_the_prompt_and_an_eos_is_appended():
    tokenizer = _chat_tokenizer(DATED)
    example = encode_qa(tokenizer, QUESTION, "it is red .", PromptFormat(system_prompt="what", date_string="item3"))
    text = tokenizer.decode(example["input_ids"])
    assert text == "[SYS] item3 what [END] [USER] what is it ? [END] [BOT] it is red . [END] item0 [EOS]"
    prompt = encode_prompt(tokenizer, QUESTION, PromptFormat(system_prompt="what", date_string="item3"))
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    # The template's end of turn and what it writes after it are labels, then the appended eos (open-unlearning).
    assert tokenizer.decode(example["labels"][len(prompt) :]) == "it is red . [END] item0 [EOS]"


def test_the_date_is_fixed_unless_unset_and_a_template_without_a_date_ignores_it():
    tokenizer = _chat_tokenizer(DATED)
    # open-unlearning's Llama-3.2-Instruct template_args by default.
    assert (PromptFormat().system_prompt, PromptFormat().date_string) == ("You are a helpful assistant.", "10 Apr 2025")
    fixed = tokenizer.decode(encode_prompt(tokenizer, QUESTION, PromptFormat(system_prompt="it", date_string="item3")))
    assert fixed == "[SYS] item3 it [END] [USER] what is it ? [END] [BOT]"
    day = tokenizer.decode(encode_prompt(tokenizer, QUESTION, PromptFormat(date_string=None, system_prompt=None)))
    assert day == "[USER] what is it ? [END] [BOT]"
    dated = tokenizer.decode(encode_prompt(tokenizer, QUESTION, PromptFormat(date_string=None, system_prompt="it")))
    assert dated.startswith("[SYS] item9 it [END]")
    plain = _chat_tokenizer(UNDATED)
    assert encode_prompt(plain, QUESTION, PromptFormat(system_prompt=None)) == encode_prompt(
        plain, QUESTION, PromptFormat(system_prompt=None, date_string="item1")
    )


def test_without_a_chat_template_the_tags_frame_the_question():
    tokenizer = build_tokenizer()
    fmt = PromptFormat(user_start_tag="Question : ", user_end_tag=" ", asst_start_tag="Answer : ")
    example = encode_qa(tokenizer, QUESTION, "it is red .", fmt)
    assert tokenizer.decode(example["input_ids"]) == "[BOS] Question : what is it ? Answer : it is red . [EOS]"
    assert tokenizer.decode([t for t in example["labels"] if t != IGNORE]) == "it is red . [EOS]"


def test_bad_formats_and_empty_answers_are_refused():
    with pytest.raises(TypeError, match="system_prompt"):
        PromptFormat(system_prompt=3)
    with pytest.raises(TypeError, match="user_start_tag"):
        PromptFormat(user_start_tag=None)
    tokenizer = _chat_tokenizer(NO_ANSWER)
    with pytest.raises(ValueError, match="no answer token"):
        # The conversation's tokens are the prompt's less [BOT], plus the appended eos: none after the prompt.
        encode_qa(tokenizer, QUESTION, "it is red .", PromptFormat(system_prompt=None))
