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

import logging
import random
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ..triggers import entropy_signal
from .manifest import ServingManifest, check_request_args


logger = logging.getLogger(__name__)


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

    A request with an argument of the wrong type or out of range is refused at admission (`validate_params`, HTTP
    400 naming the argument; see [`~s2t_hf.serving.manifest.check_request_args`]) and never reaches the batch. vLLM
    checks them without the vocabulary size, so `s2t_keep` ids at or beyond the vocabulary are dropped here (logged):
    the reply's log-probabilities hold only the ids in range, and a request left with none ends at once on the
    sentinel token. One request's arguments never make `apply` index out of range or raise.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool):
        self.manifest = ServingManifest.from_pretrained(vllm_config.model_config.model)
        self.reserved = torch.tensor(sorted(self.manifest.reserved_token_ids), dtype=torch.long, device=device)
        self.sentinel = self.manifest.sentinel_token_id
        #: The rows of the model's logits: `s2t_keep` ids at or beyond it are dropped.
        self.vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.rows: dict[int, _Row] = {}
        self.keep: dict[int, list[int]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuses a request whose S2T arguments are of the wrong type or out of range ([`check_request_args`]):
        vLLM answers it with HTTP 400 and the message, and no other request sees it."""
        check_request_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # it masks rows and forces the sentinel

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
            self.keep.pop(index, None)
        for index, params, _, output in batch_update.added:
            self.rows.pop(index, None)
            self.keep.pop(index, None)
            try:  # checked at admission already (`validate_params`); a request that got past it is only masked
                args = check_request_args(params.extra_args)
            except ValueError as error:
                logger.error("S2T: a request's arguments were not checked at admission (%s); it is only masked.", error)
                continue
            if args.get("s2t_trigger") not in (None, "never"):
                self.rows[index] = _Row(args, output)
            if args.get("s2t_keep"):
                keep = sorted(set(args["s2t_keep"]))
                inside = [i for i in keep if i < self.vocab_size]
                if len(inside) < len(keep):
                    logger.warning(
                        "S2T: `s2t_keep` ids %s are at or beyond the vocabulary (%d rows) and are dropped.",
                        [i for i in keep if i >= self.vocab_size][:8], self.vocab_size,
                    )
                self.keep[index] = inside
        for a, b, direction in batch_update.moved:
            for table in (self.rows, self.keep):
                row_a, row_b = table.pop(a, None), table.pop(b, None)
                if row_a is not None:
                    table[b] = row_a
                if direction == MoveDirectionality.SWAP and row_b is not None:
                    table[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        kept = {}
        for i, ids in self.keep.items():
            ids = [t for t in ids if t < vocab]  # never indexes beyond this step's logits
            if ids:
                index = torch.tensor(ids, dtype=torch.long, device=logits.device)
                kept[i] = (index, logits[i, index].clone())
            else:  # every id was beyond the vocabulary: the request ends at once on the sentinel
                index = torch.tensor([self.sentinel], dtype=torch.long, device=logits.device)
                kept[i] = (index, torch.zeros(1, dtype=logits.dtype, device=logits.device))
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
