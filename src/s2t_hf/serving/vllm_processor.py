"""`S2TVllmLogitsProcessor`: S2T's trigger inside a vLLM server (the v1 `LogitsProcessor` interface).

Loaded per server, never through vLLM's global entry-point group:

    python -m vllm.entrypoints.openai.api_server --model EXPORT/model \
        --logits-processors s2t_hf.serving.vllm_processor:S2TVllmLogitsProcessor \
        --logprobs-mode processed_logprobs ...

At every step of every request it masks the reserved rows of the exported checkpoint (`s2t_serving.json`). Two kinds
of request ask for more, through their extra arguments (`vllm_xargs` over REST):

- a request with `s2t_trigger` is watched: where the trigger fires, the processor leaves only the sentinel row, which
  the client sent as a stop token, so the request ends at the divergence point and the engine spends nothing more on
  it. The client ([`~s2t_hf.serving.ServedS2T`]) then selects the token and resumes;
- a request with `s2t_keep` (a list of ids) keeps only those rows, the reserved ones included: with
  `--logprobs-mode processed_logprobs` its log-probabilities are the softmax over exactly those rows (the selector's
  bins after a candidate; the candidates themselves).

The signals are the ones `S2TLogitsProcessor` computes (`s2t_hf.triggers`), on the logits after the reserved rows are
masked; the learned trigger reads its row before the masking.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..triggers import entropy_signal
from .manifest import ServingManifest


SERVED_TRIGGERS = ("entropy", "learned", "random", "always", "never")


class _Row:
    """One watched request: its trigger settings and a reference to its output tokens (vLLM keeps it current)."""

    __slots__ = ("trigger", "threshold", "warmup", "offset", "signal_top_k", "rate", "entropy_weight", "rng", "output")

    def __init__(self, args: dict[str, Any], output: list[int]):
        self.trigger = args["s2t_trigger"]
        self.threshold = float(args["s2t_threshold"]) if args.get("s2t_threshold") is not None else None
        self.warmup = int(args.get("s2t_warmup", 3))
        self.offset = int(args.get("s2t_offset", 0))
        self.signal_top_k = int(args.get("s2t_signal_top_k", 64))
        self.rate = float(args.get("s2t_rate", 0.0))
        self.entropy_weight = float(args.get("s2t_entropy_weight", 0.0))
        seed = args.get("s2t_seed")
        self.rng = random.Random(None if seed is None else int(seed) * 1_000_003 + self.offset)
        self.output = output

    def eligible(self) -> bool:
        return self.offset + len(self.output) >= self.warmup


class S2TVllmLogitsProcessor(LogitsProcessor):
    """
    Masks the exported student's reserved rows and, for the requests that ask for it, ends the request with the
    sentinel token where S2T's trigger fires.

    Per-request arguments (`SamplingParams.extra_args`, or `vllm_xargs` in a REST request): `s2t_trigger` (one of
    `entropy`, `learned`, `random`, `always`, `never`), `s2t_threshold` (entropy and learned), `s2t_warmup`,
    `s2t_offset` (tokens generated before this request: the client resumes a request with them in its prompt),
    `s2t_signal_top_k`, `s2t_rate` and `s2t_seed` (random), `s2t_entropy_weight` (learned); `s2t_keep` (the rows a
    scoring request keeps).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.manifest = ServingManifest.from_pretrained(vllm_config.model_config.model)
        self.reserved = torch.tensor(sorted(self.manifest.reserved_token_ids), dtype=torch.long, device=device)
        self.sentinel = self.manifest.sentinel_token_id
        self.rows: dict[int, _Row] = {}
        self.keep: dict[int, list[int]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = sampling_params.extra_args or {}
        keep = args.get("s2t_keep")
        if keep is not None and (not isinstance(keep, list) or not keep or not all(isinstance(i, int) for i in keep)):
            raise ValueError(f"`s2t_keep` must be a non-empty list of token ids, got {keep!r}.")
        trigger = args.get("s2t_trigger")
        if trigger is None:
            return
        if trigger not in SERVED_TRIGGERS:
            raise ValueError(f"`s2t_trigger` must be one of {SERVED_TRIGGERS}, got {trigger!r}.")
        if trigger in ("entropy", "learned") and args.get("s2t_threshold") is None:
            raise ValueError(f"`s2t_trigger={trigger!r}` needs `s2t_threshold`.")
        for name in ("s2t_threshold", "s2t_rate", "s2t_entropy_weight", "s2t_warmup", "s2t_offset",
                     "s2t_signal_top_k", "s2t_seed"):
            value = args.get(name)
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"`{name}` must be a number, got {value!r}.")

    def is_argmax_invariant(self) -> bool:
        return False  # it masks rows and forces the sentinel

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
            self.keep.pop(index, None)
        for index, params, _, output in batch_update.added:
            args = params.extra_args or {}
            self.rows.pop(index, None)
            self.keep.pop(index, None)
            if args.get("s2t_trigger") not in (None, "never"):
                self.rows[index] = _Row(args, output)
            if args.get("s2t_keep"):
                self.keep[index] = [int(i) for i in args["s2t_keep"]]
        for a, b, direction in batch_update.moved:
            for table in (self.rows, self.keep):
                row_a, row_b = table.pop(a, None), table.pop(b, None)
                if row_a is not None:
                    table[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    table[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        kept = {}
        for i, ids in self.keep.items():
            index = torch.tensor(ids, dtype=torch.long, device=logits.device)
            kept[i] = (index, logits[i, index].clone())
        logits = self._apply_trigger(logits)
        for i, (index, values) in kept.items():
            logits[i] = float("-inf")
            logits[i, index] = values
        return logits

    def _apply_trigger(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits.index_fill_(-1, self.reserved, float("-inf"))
        indices = [i for i, row in self.rows.items() if row.eligible()]
        watched = None
        if self.manifest.trigger_token_id is not None and indices:
            watched = logits[:, self.manifest.trigger_token_id].float().clone()
        logits.index_fill_(-1, self.reserved, float("-inf"))
        if not indices:
            return logits
        index = torch.tensor(indices, dtype=torch.long, device=logits.device)
        fire = []
        needs_entropy = [i for i in indices if self.rows[i].trigger == "entropy"
                         or (self.rows[i].trigger == "learned" and self.rows[i].entropy_weight)]
        entropy: dict[int, float] = {}
        if needs_entropy:
            by_k: dict[int, list[int]] = {}
            for i in needs_entropy:
                by_k.setdefault(self.rows[i].signal_top_k, []).append(i)
            for k, rows in by_k.items():
                values = entropy_signal(logits[torch.tensor(rows, device=logits.device)], k).tolist()
                entropy.update(zip(rows, values))
        learned = watched[index].tolist() if watched is not None else None
        for n, i in enumerate(indices):
            row = self.rows[i]
            if row.trigger == "always":
                fire.append(i)
            elif row.trigger == "random":
                if row.rng.random() < row.rate:
                    fire.append(i)
            elif row.trigger == "entropy":
                if entropy[i] > row.threshold:  # NaN never fires
                    fire.append(i)
            elif row.trigger == "learned":
                if learned is None:
                    continue
                signal = learned[n] + (row.entropy_weight * entropy[i] if row.entropy_weight else 0.0)
                if signal > row.threshold:
                    fire.append(i)
        if fire:
            fired = torch.tensor(fire, dtype=torch.long, device=logits.device)
            logits[fired] = float("-inf")
            logits[fired, self.sentinel] = 0.0
        return logits
