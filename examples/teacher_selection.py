"""Collaborative S2T: a teacher chooses among the student's top-K at calibrated entropy triggers.

Runs offline on CPU with two tiny random Llama models built from a config (replace them with real checkpoints, e.g.
Qwen2.5-1.5B-Instruct and Qwen2.5-32B-Instruct; for a teacher of another model family see
`examples/teacher_across_tokenizers.py`).

    python examples/teacher_selection.py
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from s2t_hf import S2TLogitsProcessor


def tiny(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


student, teacher = tiny(0), tiny(1)
calibration = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [20, 21, 22]]
prompts = torch.tensor([[0, 0, 30, 31, 32], [40, 41, 42, 43, 44]])  # left padded
attention_mask = (prompts != 0).long()

with S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", selection="teacher", top_k=8) as s2t:
    threshold = s2t.calibrate(calibration, target_rate=0.2, max_new_tokens=32, pad_token_id=0)
    out = student.generate(
        input_ids=prompts, attention_mask=attention_mask, max_new_tokens=32, do_sample=False, pad_token_id=0,
        logits_processor=[s2t],
    )
    stats = s2t.stats

print(f"entropy threshold for a 20% rate: {threshold:.3f}")
print(out[:, prompts.shape[1] :])
print({k: v for k, v in stats.items() if not k.endswith("_per_row")})

# Takeover baseline: the teacher emits its own argmax at trigger steps.
with S2TLogitsProcessor(student, teacher=teacher, trigger="entropy", trigger_threshold=threshold,
                        selection="takeover") as takeover:
    student.generate(input_ids=prompts, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                     pad_token_id=0, logits_processor=[takeover])
    print("takeover trigger rate:", round(takeover.stats["trigger_rate"], 3))

# The rest of a generation config still holds: no selection emits a token it rules out. Here the teacher takes over at
# every step, without its favourite tokens and without ending before 16 tokens: its argmax among the allowed tokens.
banned = sorted(set(out[:, prompts.shape[1] :][:, :4].flatten().tolist()) - {0, 1})
constraints = dict(bad_words_ids=[[t] for t in banned], min_new_tokens=16)
with S2TLogitsProcessor(student, teacher=teacher, trigger="always", selection="takeover", warmup_tokens=0) as always:
    constrained = student.generate(input_ids=prompts, attention_mask=attention_mask, max_new_tokens=16,
                                   do_sample=False, pad_token_id=0, logits_processor=[always], **constraints)
teacher_own = teacher.generate(input_ids=prompts, attention_mask=attention_mask, max_new_tokens=16, do_sample=False,
                               pad_token_id=0, **constraints)
assert torch.equal(constrained, teacher_own)  # the teacher's own constrained decoding
assert not set(constrained[:, prompts.shape[1] :].flatten().tolist()) & set(banned)
print("constrained takeover == the teacher's constrained generate; banned tokens:", banned)
