"""The model card (`README.md`) that `S2TSelector.save_pretrained` and `push_to_hub` write next to the adapter."""

from __future__ import annotations

import json

from .config import S2TConfig


__all__ = ["MODEL_CARD_NAME", "selector_model_card"]

MODEL_CARD_NAME = "README.md"


def selector_model_card(config: S2TConfig, peft_config, location: str, metrics: dict | None = None) -> str:
    """
    The model card of a selector: Hub metadata, what the selector is, how to use it, its settings and `metrics`.

    Args:
        config (`S2TConfig`):
            The selector's config (`bin_token_ids` set).
        peft_config (`peft.PeftConfig`):
            The config of the selector's adapter (`LoraConfig` or `TrainableTokensConfig`).
        location (`str`):
            Where the selector is stored (a folder or a Hub repository id), for the usage example.
        metrics (`dict`, *optional*):
            Evaluation results, shown as a table.

    Returns:
        `str`: the card, Markdown with a YAML header.
    """
    from peft import PeftType

    uses_lora = peft_config.peft_type == PeftType.LORA
    return "\n".join(_header(config, uses_lora) + _body(config, peft_config, uses_lora, location, metrics))


def _header(config: S2TConfig, uses_lora: bool) -> list[str]:
    base = config.base_model_name_or_path
    header = ["---", "library_name: peft"]
    if base:
        header.append(f"base_model: {json.dumps(base)}")
    header += ["tags:", "- s2t_hf", "- select-to-think", "- peft"]
    header += ["- lora"] if uses_lora else []
    header += ["pipeline_tag: text-generation", "---", ""]
    return header


def _adapter_description(config: S2TConfig, peft_config, uses_lora: bool) -> str:
    if uses_lora:
        return (
            f"LoRA (r {peft_config.r}, alpha {peft_config.lora_alpha}, dropout {peft_config.lora_dropout}) on "
            f"`{'`, `'.join(sorted(peft_config.target_modules))}`, plus the {config.num_bins} bin rows of the "
            "output head"
        )
    return f"the {config.num_bins} bin rows of the output head only"


def _body(config: S2TConfig, peft_config, uses_lora: bool, location: str, metrics: dict | None) -> list[str]:
    from peft import __version__ as peft_version

    from .version import __version__

    base = config.base_model_name_or_path
    adapter = _adapter_description(config, peft_config, uses_lora)
    base_line = f"`{base}`" if base else "its base model"
    residual = ""
    if config.scoring == "residual":
        residual = f" (tau {config.residual_tau}, on the {config.residual_log_probs}'s log-probabilities)"
    lines = [
        f"# S2T local selector for {base_line}",
        "",
        "A Select-to-Think (S2T-Local) selector made with [s2t_hf](https://pypi.org/project/s2t-hf/). At "
        "uncertain decoding steps the student picks among its own top-K candidates; each candidate is scored by "
        f"the expected value of {config.num_bins} reserved output rows (\"bins\", token ids "
        f"{config.bin_token_ids[0]}..{config.bin_token_ids[-1]}) read at its position.",
        "",
        f"The adapter is a standard PEFT adapter: {adapter}. The whole output head is never stored."
        + (
            f" The base model's embeddings get {config.num_added_rows} extra rows on load (`num_added_rows` in "
            "`s2t_config.json`)."
            if config.num_added_rows
            else ""
        ),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from s2t_hf import S2TLogitsProcessor",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base or "<base model>"}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base or "<base model>"}")',
        'inputs = tokenizer("Natalia sold 48 clips in April...", return_tensors="pt")',
        "",
        f'processor = S2TLogitsProcessor.from_pretrained("{location}", model=model)',
        "out = model.generate(**inputs, logits_processor=[processor])",
        "```",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| selection | `{config.selection}` |",
        f"| scoring | `{config.scoring}`{residual} |",
        f"| trigger | `{config.trigger}` |",
        *(
            [f"| trigger_token_id | {config.trigger_token_id} (learned trigger row) |"]
            if config.trigger_token_id is not None
            else []
        ),
        f"| adapter_mode | `{config.adapter_mode}` |",
        f"| top_k | {config.top_k} |",
        f"| num_bins | {config.num_bins} |",
        f"| vocab_fingerprint | `{config.vocab_fingerprint}` |",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {str(key).replace('|', '/')} | {shown.replace('|', '/')} |")
        lines.append("")
    lines += _use_and_limits(config, base_line)
    lines += [f"Written by s2t_hf {__version__} with PEFT {peft_version}.", ""]
    return lines


def _use_and_limits(config: S2TConfig, base_line: str) -> list[str]:
    """The card's intended use, limitations and licence: what holds for every selector."""
    threshold = (
        f"The trigger threshold ({config.trigger_threshold:.4g}) fits the prompts it was calibrated on"
        if config.trigger_threshold is not None
        else "The selector has no trigger threshold yet"
    )
    generating = (
        "Its adapter is active only while candidates are scored (`adapter_mode=\"scoring\"`): every token outside a "
        "trigger is the base model's own."
        if config.adapter_mode == "scoring"
        else "Its adapter stays active while generating (`adapter_mode=\"generate\"`), so it changes every token "
        "the model writes, not only the selected ones: check the adapted model's own greedy output too."
    )
    return [
        "## Intended use",
        "",
        f"Decoding with s2t_hf's `S2TLogitsProcessor` (or `s2t_hf.generate`) on {base_line}, the model it was trained "
        "on (`vocab_fingerprint` is checked on load): at the steps where the trigger fires, it re-ranks the model's "
        f"own top-{config.top_k} candidates. {generating} It is not a standalone model.",
        "",
        "## Limitations",
        "",
        "- It selects only among the model's own top-K candidates: a token the model ranks lower is out of its reach.",
        "- It learned the choices of one teacher on one kind of prompt. Agreement with that teacher need not become "
        "accuracy: measure held-out accuracy on your own task before relying on it.",
        f"- {threshold}; calibrate it on prompts like yours (`processor.calibrate(prompts, target_rate=...)`).",
        "- It inherits the base model's errors and biases, and those of the data and teacher it was trained with.",
        "",
        "## Licence",
        "",
        f"The adapter is derived from {base_line}: use it under that model's licence and the terms of the data it was "
        "trained on. s2t_hf, which wrote it, is Apache-2.0.",
        "",
    ]
