"""The `s2t` model type of lm-evaluation-harness: lm-eval's Hugging Face model with S2T decoding in its generate calls.

Install with `pip install "s2t-hf[lm-eval]"`, then run lm-eval's command line through `s2t-lm-eval` (the same
arguments as `lm_eval`; it registers the `s2t` model type first, since lm-eval 0.4 discovers no model plugins):

```bash
s2t-lm-eval --model s2t --tasks gsm8k --batch_size 16 \\
    --model_args pretrained=Qwen/Qwen2.5-1.5B-Instruct,teacher=http://127.0.0.1:8000,trigger=entropy,trigger_rate=0.01
```

From Python, import this module (which registers the model type) and call `lm_eval.simple_evaluate(model="s2t", ...)`.

Model arguments beyond those of lm-eval's `hf` model:

- `selector`: a trained local selector (directory or Hub id), for S2T-Local (`selection=local`, no teacher);
- `teacher`: a teacher model (directory or Hub id, loaded like the student) or the address of a vLLM server
  (`http://...`; see `docs/serving.md`); `teacher_model` names the served model if the server has several;
- `selection` (`teacher`, `takeover` or `local`; defaults to `local` with a selector, else `teacher`), `trigger`,
  `trigger_threshold`, `trigger_rate`, `top_k`, `warmup_tokens`, and any other [`S2TConfig`] field;
- `calibration_size` (default 32): with an `entropy`/`kl` trigger, a `trigger_rate` and no threshold (neither given
  nor saved with the selector), the threshold is calibrated on the first `calibration_size` prompts of the first
  `generate_until` batch of requests (the student's own greedy decoding, no labels).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from transformers.utils import logging


try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own model types first)
    import lm_eval.tasks
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - depends on the extra
    raise ImportError(
        "The `s2t` model type of lm-evaluation-harness needs `lm-eval`; install it with "
        '`pip install "s2t-hf[lm-eval]"`.'
    ) from error

from ..config import S2TConfig
from ..processor import S2TLogitsProcessor


__all__ = ["LOCAL_TASKS", "S2TLM", "local_task", "main"]

logger = logging.get_logger(__name__)

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(S2TConfig)}


@register_model("s2t")
class S2TLM(HFLM):
    """
    lm-eval's Hugging Face causal LM (`hf`) whose `generate` calls decode with an [`S2TLogitsProcessor`]: S2T with a
    teacher (local or served by vLLM), Takeover, or S2T-Local with a trained selector.

    Log-likelihood requests (`loglikelihood`, `loglikelihood_rolling`) score the **base student**, as lm-eval's `hf`
    model does on the same checkpoint: the processor is open (its hook on the model, the selector's rows merged) only
    during `generate` calls, and with a selector every scoring forward runs with its adapter disabled (no LoRA, no
    trained rows) and without the rows added for the bins, if any. S2T changes generation only.

    Call [`~S2TLM.close`] when done (or use the model as a context manager) to stop a served teacher's threads.

    Args:
        pretrained (`str` or `PreTrainedModel`):
            The student.
        selector (`str`, *optional*):
            A trained selector (directory or Hub id) for S2T-Local.
        teacher (`str` or `PreTrainedModel` or `Teacher`, *optional*):
            A teacher model (directory or Hub id), an `http(s)://` address of a vLLM server, or a teacher object.
        teacher_model (`str`, *optional*):
            The served model's name on a teacher server with several.
        teacher_dtype (`str`, *optional*):
            dtype of a local teacher (defaults to `dtype`).
        teacher_gguf_file (`str`, *optional*):
            A GGUF file in the local teacher's directory to load it from (as `gguf_file` does for the student).

    A local teacher is loaded with its own tokenizer: a teacher of another model family (another tokenizer) then
    scores the student's candidates as text (see `docs/method.md`), reading the student's prompt as text.
        calibration_size (`int`, *optional*, defaults to 32):
            Prompts used to calibrate a threshold from `trigger_rate` when none is given.
        kwargs:
            [`S2TConfig`] fields (`trigger`, `trigger_rate`, `trigger_threshold`, `top_k`, `selection`, ...) and the
            arguments of lm-eval's `HFLM`.
    """

    def __init__(
        self,
        pretrained: Any,
        selector: str | None = None,
        teacher: Any = None,
        teacher_model: str | None = None,
        teacher_dtype: str | None = None,
        teacher_gguf_file: str | None = None,
        calibration_size: int = 32,
        **kwargs: Any,
    ):
        s2t_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
        if selector is not None and teacher is not None and s2t_kwargs.get("selection", "local") == "local":
            raise ValueError(
                "Give either `selector` (S2T-Local) or `teacher` (S2T / takeover), not both; or set `selection` to "
                "`teacher` or `takeover` to use the teacher with the selector's saved settings."
            )
        if "trust_remote_code" in kwargs:  # "False" from Python must not turn custom code on
            kwargs["trust_remote_code"] = _as_bool(kwargs["trust_remote_code"], "trust_remote_code")
        super().__init__(pretrained=pretrained, **kwargs)
        self.calibration_size = int(calibration_size)
        dtype = teacher_dtype or kwargs.get("dtype", "auto")
        trust_remote_code = kwargs.get("trust_remote_code", False)
        self._teacher_object = self._load_teacher(teacher, teacher_model, dtype, trust_remote_code, teacher_gguf_file)
        if selector is not None:
            processor = S2TLogitsProcessor.from_pretrained(selector, model=self.model, teacher=self._teacher_object,
                                                           tokenizer=self.tokenizer, **s2t_kwargs)
        else:
            s2t_kwargs.setdefault("selection", "teacher")
            processor = S2TLogitsProcessor(self.model, teacher=self._teacher_object, tokenizer=self.tokenizer,
                                           **s2t_kwargs)
        self.s2t = processor
        processor.remove_hooks()  # opened around each `generate` call only (`_model_generate`)
        config = processor.config
        without_threshold = config.trigger_has_threshold and config.trigger_threshold is None
        self._needs_calibration = without_threshold and config.trigger_rate is not None
        if without_threshold and config.trigger_rate is None:
            raise ValueError(
                f"The `{config.trigger}` trigger needs `trigger_threshold=...` or `trigger_rate=...` (a threshold is "
                "then calibrated on the first prompts) in `--model_args`."
            )

    def _load_teacher(
        self, teacher: Any, served_model: str | None, dtype: Any, trust_remote_code: bool, gguf_file: str | None
    ) -> Any:
        """The teacher object: as given, a `RemoteTeacher` for an address, or a `LocalTeacher` of a model loaded as the
        student is, with its own tokenizer (its custom code runs only with `trust_remote_code=True` in
        `--model_args`, as for the student)."""
        if teacher is None or not isinstance(teacher, str):
            return teacher
        if teacher.startswith(("http://", "https://")):
            from ..teachers import RemoteTeacher

            return RemoteTeacher(teacher, tokenizer=self.tokenizer, model=served_model)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..teachers import LocalTeacher

        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        options = {"trust_remote_code": bool(trust_remote_code), **({"gguf_file": gguf_file} if gguf_file else {})}
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype, **options)
        tokenizer = AutoTokenizer.from_pretrained(teacher, **options)
        return LocalTeacher(model.to(self.device).eval(), tokenizer=tokenizer)

    def generate_until(self, requests, disable_tqdm: bool = False):
        if self._needs_calibration and requests:
            prompts = [self.tok_encode(request.args[0]) for request in requests[: self.calibration_size]]
            gen_kwargs = dict(requests[0].args[1]) if len(requests[0].args) > 1 else {}
            max_new_tokens = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            batch_size = self.batch_size if isinstance(self.batch_size, int) else 8
            with self.s2t:
                threshold = self.s2t.calibrate(
                    prompts, tokenizer=self.tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            logger.info(f"Calibrated the S2T trigger on {len(prompts)} prompts: threshold {threshold:.4f}.")
            self._needs_calibration = False
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        # `HFLM._model_generate` calls `generate(input_ids=...)` without an attention mask of its own: it forwards the
        # one `generate_until` passes in `generation_kwargs` (lm-eval 0.4.13), and other callers may pass none. Without
        # it left-padded rows would attend to the padding (and the processor would see no padding), so rebuild it.
        if generation_kwargs.get("attention_mask") is None:
            pad = self.tokenizer.pad_token_id
            mask = torch.ones_like(context) if pad is None else (context != pad).long()
            # left padding only: a pad id inside the text (pad == eos) stays attended
            generation_kwargs["attention_mask"] = (mask.cumsum(-1) > 0).long()
        processors = list(generation_kwargs.pop("logits_processor", None) or [])
        generation_kwargs["logits_processor"] = [*processors, self.s2t]
        with self.s2t:  # its hook and the selector's merged rows, for this call only
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: Any = None):
        """The scoring forward of log-likelihood requests: the base student (the selector's adapter disabled, the rows
        added for its bins left out)."""
        selector = self.s2t.selector
        if selector is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with selector.adapter_disabled():
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        added = selector.config.num_added_rows or 0
        return logits[..., : logits.shape[-1] - added] if added else logits

    def close(self) -> None:
        """Closes the processor (its hook off the model) and the teacher (a served teacher's request threads)."""
        self.s2t.remove_hooks()
        close = getattr(self._teacher_object, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> S2TLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def s2t_stats(self) -> dict[str, Any]:
        """The processor's statistics of the last generate call."""
        return self.s2t.stats


def _as_bool(value: Any, name: str) -> bool:
    """A boolean model argument given as a bool or as text (`true`/`false`, `1`/`0`, `yes`/`no`)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"`{name}` must be true or false, got {value!r}.")


# lm-eval's own task files that `local_task` can point at local JSONL files: task -> (YAML under `lm_eval/tasks`, the
# splits the task reads)
LOCAL_TASKS = {
    "gsm8k": ("gsm8k/gsm8k.yaml", ("train", "test")),
    "gsm8k_cot": ("gsm8k/gsm8k-cot.yaml", ("train", "test")),
}


def local_task(task: str, data_dir: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """
    Writes `<task>_local.yaml` into `output_dir`: lm-eval's own `task` (its prompt, few-shot examples, generation
    settings, filters and metrics, taken by `include`, not copied) reading its splits from `data_dir/<split>.jsonl`
    instead of the Hub. Pass `output_dir` to lm-eval as `--include_path` (or to `TaskManager(include_path=...)`) and
    ask for the task `<task>_local`. `s2t-lm-eval --local_data <task>=<data_dir>` does both.

    Args:
        task (`str`): one of `LOCAL_TASKS` (`gsm8k`, `gsm8k_cot`).
        data_dir (`str` or `os.PathLike`): a folder with one JSONL file per split the task reads (for GSM8K,
            `train.jsonl` and `test.jsonl` in OpenAI's release format: `question`, `answer`).
        output_dir (`str` or `os.PathLike`): where the task file goes.

    Returns:
        `str`: the name of the local task, `<task>_local`.
    """
    if task not in LOCAL_TASKS:
        raise ValueError(f"`task` must be one of {sorted(LOCAL_TASKS)} for a local dataset, got {task!r}.")
    relative, splits = LOCAL_TASKS[task]
    included = os.path.join(os.path.dirname(os.path.abspath(lm_eval.tasks.__file__)), relative)
    if not os.path.isfile(included):
        raise ValueError(f"The installed lm-eval has no task file {relative!r} to include; upgrade `lm-eval`.")
    data_dir = os.path.abspath(data_dir)
    missing = [split for split in splits if not os.path.isfile(os.path.join(data_dir, f"{split}.jsonl"))]
    if missing:
        raise ValueError(
            f"`{task}` reads the splits {list(splits)} but {data_dir} has no {', '.join(f'{m}.jsonl' for m in missing)}. "
            "Give the folder that holds one JSONL file per split."
        )
    name = f"{task}_local"
    files = "".join(f"    {split}: {json.dumps(os.path.join(data_dir, f'{split}.jsonl'))}\n" for split in splits)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}.yaml"), "w") as handle:
        handle.write(
            f"include: {json.dumps(included)}\n"
            f"task: {name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{files}"
        )
    return name


def _local_data_arguments(argv: list[str], output_dir: str) -> list[str]:
    """`argv` with every `--local_data TASK=DIR` replaced by an `--include_path` to the task files written for them."""
    out, wrote = [], False
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--local_data" or argument.startswith("--local_data="):
            value = argument.split("=", 1)[1] if "=" in argument else next(arguments, "")
            task, sep, data_dir = value.partition("=")
            if not sep:
                raise SystemExit(f"--local_data takes TASK=DIR (e.g. gsm8k=data/gsm8k), got {value!r}.")
            local_task(task, data_dir, output_dir)
            wrote = True
        else:
            out.append(argument)
    return [*out, "--include_path", output_dir] if wrote else out


def main() -> None:
    """
    `s2t-lm-eval`: lm-eval's command line with the `s2t` model type registered, and `--local_data TASK=DIR`, which runs
    lm-eval's own `TASK` on local JSONL files as the task `TASK_local` (see [`local_task`]).
    """
    import sys
    import tempfile

    from lm_eval.__main__ import cli_evaluate

    with tempfile.TemporaryDirectory(prefix="s2t_lm_eval_tasks_") as output_dir:
        sys.argv = [sys.argv[0], *_local_data_arguments(sys.argv[1:], output_dir)]
        cli_evaluate()


if __name__ == "__main__":
    main()
