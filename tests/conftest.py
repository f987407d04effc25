"""Tiny random models built from configs (no network) shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)


VOCAB = 96
PAD, EOS = 0, 1


def tiny_config(arch: str, vocab_size: int = VOCAB, hidden: int = 32, layers: int = 2, **overrides):
    # a wide initialisation makes random tiny models confident enough for greedy paths and triggers to mean something
    common = dict(vocab_size=vocab_size, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, initializer_range=0.2)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common, **overrides)
    decoder = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**decoder, **overrides)
    if arch == "qwen2":
        return Qwen2Config(**decoder, **overrides)
    if arch == "qwen3":
        return Qwen3Config(**decoder, head_dim=8, **overrides)
    if arch == "mistral":
        return MistralConfig(**decoder, sliding_window=None, **overrides)
    if arch == "gemma":
        return GemmaConfig(**decoder, head_dim=8, **overrides)
    # sliding-window and hybrid caches: windows shorter than `long_left_padded_batch`'s prompts
    window = {"sliding_window": overrides.pop("sliding_window", 6)}
    if arch == "gemma2":  # alternating sliding and full layers, logit soft-capping
        return Gemma2Config(**{**decoder, "num_hidden_layers": max(layers, 2)}, head_dim=8, **window, **overrides)
    if arch == "gemma3":
        overrides.setdefault("layer_types", ["sliding_attention", "full_attention"] * max(1, layers // 2))
        return Gemma3TextConfig(**{**decoder, "num_hidden_layers": max(layers, 2)}, head_dim=8, **window, **overrides)
    if arch == "mistral-window":  # every layer slides
        return MistralConfig(**decoder, **window, **overrides)
    if arch == "qwen2-window":  # sliding layers above `max_window_layers`
        return Qwen2Config(**decoder, use_sliding_window=True, max_window_layers=1, **window, **overrides)
    raise ValueError(arch)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"]
SLIDING_ARCHITECTURES = ["gemma2", "gemma3", "mistral-window", "qwen2-window"]


def tiny_model(arch: str = "llama", seed: int = 0, attn: str = "sdpa", dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)
    return model.to(dtype).eval()


def left_padded_batch():
    """Three prompts of different lengths, left padded with PAD."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    length = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return prompts, input_ids, attention_mask


def long_left_padded_batch():
    """Three prompts longer than the sliding windows of `SLIDING_ARCHITECTURES`, left padded with PAD."""
    prompts = [list(range(5, 17)), list(range(20, 27)), list(range(30, 40))]
    length = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return prompts, input_ids, attention_mask


GREEDY = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=12)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


def entropy_gap_threshold(scores) -> float:
    """An entropy threshold near the median of the steps' signals (`scores`: `generate`'s `output_scores`), in a clear
    gap between two values: a step whose signal sat on the threshold would trigger or not depending on float rounding
    (batch vs reference, thread count)."""
    values = []
    for step in scores:
        top = torch.softmax(step.float().topk(64).values, dim=-1)
        values.append(-(top * top.log()).sum(-1))
    values = sorted(torch.cat(values).tolist())
    middle = len(values) // 2
    for offset in range(len(values)):
        for i in (middle + offset, middle - offset):
            if 0 <= i < len(values) - 1 and values[i + 1] - values[i] > 1e-3:
                return (values[i] + values[i + 1]) / 2
    raise AssertionError("no gap between the entropy values")


def custom_code_checkpoint(path):
    """A local checkpoint whose config and tokenizer ask for custom code (`auto_map`); the code writes `RAN` into the
    checkpoint when imported. Loaders must refuse it without running it (`trust_remote_code` is never turned on)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    code = (
        "import pathlib\n"
        f"pathlib.Path({str(path / 'RAN')!r}).write_text('custom code ran')\n"  # transformers imports a copy
        "from transformers import PretrainedConfig\n"
        "class ProbeConfig(PretrainedConfig):\n"
        "    model_type = 's2t_custom_probe'\n"
    )
    for module in ("configuration_probe", "modeling_probe", "tokenization_probe"):
        (path / f"{module}.py").write_text(code)
    tokenizer = {"AutoTokenizer": ["tokenization_probe.ProbeTokenizer", None]}
    auto_map = {
        "AutoConfig": "configuration_probe.ProbeConfig", "AutoModelForCausalLM": "modeling_probe.Probe", **tokenizer
    }
    (path / "config.json").write_text(json.dumps({"model_type": "s2t_custom_probe", "auto_map": auto_map}))
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer}))
    return path
