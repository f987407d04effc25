"""`encode_prompts` on the built-in task's tokenizer (built locally): left padding against the tokenizer's own, the chat
template against `apply_chat_template`, token ids in every form, and the errors of bad input. `generate_batched` is
tested in `tests/test_generation_batched.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2t_hf import encode_prompts
from s2t_hf.tasks import build_tokenizer


TEXTS = ["tom has 5 apples .", "ann has 3 pens and 2 cups .", "bob"]


@pytest.fixture
def tokenizer():
    return build_tokenizer()  # fresh per test: some tests change its padding side, template or pad token


# --------------------------------------------------------------------------------------------------------------------
# encode_prompts


def test_left_padding_matches_the_tokenizer_and_keeps_its_padding_side(tokenizer):
    tokenizer.padding_side = "right"
    batch = encode_prompts(TEXTS, tokenizer, chat_template=False, device="meta")
    assert tokenizer.padding_side == "right"
    assert batch["input_ids"].device.type == "meta" and batch["attention_mask"].device.type == "meta"
    batch = encode_prompts(TEXTS, tokenizer, chat_template=False)
    reference = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert batch["input_ids"][2, 0] == tokenizer.pad_token_id and batch["attention_mask"][2].tolist()[-2:] == [0, 1]
    # the pad id can be chosen; the mask does not change
    other = encode_prompts(TEXTS, tokenizer, chat_template=False, pad_token_id=7)
    assert torch.equal(other["attention_mask"], reference["attention_mask"])
    assert set(other["input_ids"][reference["attention_mask"] == 0].tolist()) == {7}


def test_chat_template_applied_to_messages_and_strings(tokenizer):
    chats = [[{"role": "user", "content": text}] for text in TEXTS]
    expected = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]
    for prompts in (chats, TEXTS, [chats[0], TEXTS[1], chats[2]]):
        batch = encode_prompts(prompts, tokenizer)  # the tokenizer has a template: strings are one user message
        rows = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert rows == expected
    assert tokenizer.convert_ids_to_tokens(expected[0])[-1] == "<assistant>"
    plain = encode_prompts(TEXTS[:1], tokenizer, chat_template=False)["input_ids"][0].tolist()
    assert plain == tokenizer(TEXTS[0])["input_ids"] and "<assistant>" not in tokenizer.convert_ids_to_tokens(plain)
    tokenizer.chat_template = None  # without a template strings are plain text by default
    assert encode_prompts(TEXTS[:1], tokenizer)["input_ids"][0].tolist() == plain


def test_token_ids_in_every_form():
    expected = [[0, 0, 5, 6, 7], [10, 11, 12, 13, 14], [0, 0, 0, 0, 30]]
    prompts = [[5, 6, 7], list(range(10, 15)), [30]]
    forms = [
        prompts,
        [torch.tensor(p) for p in prompts],
        [np.array(p) for p in prompts],
        [tuple(p) for p in prompts],
        (p for p in prompts),
    ]
    for form in forms:
        assert encode_prompts(form, pad_token_id=0)["input_ids"].tolist() == expected
    batch = encode_prompts(torch.tensor([[1, 2], [3, 4]]), pad_token_id=0)  # a 2-D tensor: one prompt per row
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]] and batch["attention_mask"].all()


def test_encode_prompts_errors(tokenizer):
    with pytest.raises(ValueError, match="`prompts` is empty"):
        encode_prompts([], tokenizer)
    with pytest.raises(ValueError, match=r"`prompts\[1\]` is empty"):
        encode_prompts(["tom", ""], tokenizer, chat_template=False)
    with pytest.raises(ValueError, match=r"`prompts\[0\]` is empty"):
        encode_prompts([[]], pad_token_id=0)
    with pytest.raises(TypeError, match="wrap it in a list"):
        encode_prompts("tom has 5 apples .", tokenizer)
    with pytest.raises(TypeError, match=r"Wrap it in a list: `\[\[5, \.\.\.\]\]`"):
        encode_prompts([5, 6, 7], pad_token_id=0)
    with pytest.raises(TypeError, match="one chat"):
        encode_prompts([{"role": "user", "content": "tom"}], tokenizer)
    with pytest.raises(TypeError, match=r"`prompts\[1\]` must be a string, a list of chat messages or a list of"):
        encode_prompts([[1, 2], [1.5, 2]], pad_token_id=0)
    with pytest.raises(ValueError, match="negative token ids"):
        encode_prompts([[1, -2]], pad_token_id=0)
    with pytest.raises(ValueError, match="must be 2-D"):
        encode_prompts(torch.ones(2, 2, 2, dtype=torch.long), pad_token_id=0)
    with pytest.raises(ValueError, match="pass the `tokenizer`"):
        encode_prompts(TEXTS)
    with pytest.raises(ValueError, match="`pad_token_id=...` or a tokenizer"):
        encode_prompts([[1, 2]])
    with pytest.raises(ValueError, match="`pad_token_id` must be a non-negative integer"):
        encode_prompts([[1, 2]], pad_token_id=-1)
    with pytest.raises(ValueError, match=r"`prompts\[0\]` is a list of chat messages but `chat_template=False`"):
        encode_prompts([[{"role": "user", "content": "tom"}]], tokenizer, chat_template=False)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*`tokenizer.pad_token = tokenizer.eos_token`"):
        encode_prompts(TEXTS, tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="`chat_template=True` but the tokenizer has no chat template"):
        encode_prompts(TEXTS, tokenizer, chat_template=True, pad_token_id=0)
    with pytest.raises(ValueError, match="the tokenizer has no chat template; .* set `tokenizer.chat_template`"):
        encode_prompts([[{"role": "user", "content": "tom"}]], tokenizer, pad_token_id=0)
