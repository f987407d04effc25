"""S2T-Local: create a local selector, save it as a PEFT adapter, and load it back in two lines.

Then the variant the built-in demo uses: a cache-preserving selector (LoRA only on the last layer's query, output and
MLP projections) active only while it scores, so the student generates exactly as itself and the selector scores
candidates on the student's live KV cache.

The selector here is untrained (every candidate scores 0.5, so it keeps the student's choice); train one with
`examples/train_selector.py` or `s2t-hf train`. Runs offline on CPU with a tiny Qwen2 model whose output layer has
spare rows above its tokenizer's vocabulary (like the real Qwen2.5 models).

    python examples/local_selector.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import s2t_hf
from s2t_hf import S2TConfig, S2TLogitsProcessor, S2TSelector


def base_model():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


model = base_model()
# rows 144..159 are spare (a tokenizer of 144 tokens): use them as the 16 bins
config = S2TConfig(selection="local", trigger="entropy", trigger_threshold=3.0, top_k=8, scoring="residual")
selector = S2TSelector.create(model, bin_token_ids=list(range(144, 160)), use_lora=True, config=config)

with tempfile.TemporaryDirectory() as directory:
    selector.save_pretrained(directory, metrics={"agreement@1": 0.0})
    print("saved:", sorted(__import__("os").listdir(directory)))

    # --- the two lines a user needs ---
    fresh = base_model()
    s2t = S2TLogitsProcessor.from_pretrained(directory, model=fresh)
    out = fresh.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=16, do_sample=False, logits_processor=[s2t])
    # ----------------------------------
    print(out)
    print("triggers:", s2t.stats["triggers"], "scored on:", s2t.stats["local_path"])
    s2t.remove_hooks()

# --- a cache-preserving selector used only while scoring ---
model = base_model()
config = S2TConfig(
    selection="local", trigger="entropy", trigger_threshold=3.0, top_k=8, scoring="residual", adapter_mode="scoring"
)
selector = S2TSelector.create(model, bin_token_ids=list(range(144, 160)), preserve_cache=True, config=config)
print("preserves the KV cache:", selector.preserves_cache)
with S2TLogitsProcessor(model, selector.config, selector=selector) as s2t:
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=16, do_sample=False, logits_processor=[s2t])
    print("triggers:", s2t.stats["triggers"], "scored on:", s2t.stats["local_path"])
    # the fused loop: the same tokens; a selector active while generating (`adapter_mode="generate"`) has its
    # candidates scored inside the decoding forward (docs/decoding.md)
    fused = s2t_hf.generate(model, s2t, input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=16, do_sample=False)
    print("fused loop gives the same tokens:", torch.equal(out, fused))
