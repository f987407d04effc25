"""A fuzz test of the served student against a real vLLM server (marker `engine`, its own server): a few hundred
requests with random and adversarial S2T arguments (`vllm_xargs`), sent concurrently with S2T decoding through
`ServedS2T`. Every bad request is refused on its own with HTTP 4xx naming its argument, every valid one completes, the
server stays up, and the decoding gives the tokens of `S2TLogitsProcessor` in transformers throughout.

See tests/test_remote_teacher.py for how the engine is found (`S2T_ENGINE_PYTHON`).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_fuzz import random_case
from test_served_student import NEW_TOKENS, PROMPTS, client, reference, served  # noqa: F401 (`served`: a fixture)

from s2t_hf.serving.manifest import check_request_args


pytestmark = pytest.mark.engine

REQUESTS = 300


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    """`POST /v1/completions` with `body` as JSON (NaN and infinities written as Python's `json` writes them)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"raw": text.decode(errors="replace")}


def test_fuzzed_requests_are_refused_on_their_own_and_the_server_stays_up(served):
    server, export, selector, student, tokenizer = served
    settings = dict(selection="local", trigger="always", warmup_tokens=0, top_k=4, scoring="residual",
                    adapter_mode="scoring")
    expected, _ = reference(student, selector, tokenizer, **settings)
    s2t = client(served, **settings)
    model = s2t._served_models()[0]
    vocab, sentinel = student.config.vocab_size, export.manifest.sentinel_token_id
    rng = random.Random(0)
    cases = [random_case(rng, vocab, sentinel) for _ in range(REQUESTS)]

    def one(case) -> tuple[dict, str | None, int, dict]:
        args, name = case
        if name == "?":  # a random mix: what the check says
            try:
                check_request_args(args)
                name = None
            except ValueError as error:
                name = str(error).split("`")[1]
        body = {"model": model, "prompt": list(PROMPTS[0]), "max_tokens": 2, "temperature": 0, "logprobs": 5,
                "return_tokens_as_token_ids": True, "stop_token_ids": [sentinel], "vllm_xargs": args}
        status, answer = post(server.url, body)
        return args, name, status, answer

    decoded, stop = [], threading.Event()

    def decode_meanwhile():
        while not stop.is_set():
            decoded.append([c.token_ids for c in s2t.generate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)])

    decoder = threading.Thread(target=decode_meanwhile)
    start = time.monotonic()
    decoder.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, cases))
    finally:
        stop.set()
        decoder.join()
    elapsed = time.monotonic() - start

    refused = accepted = 0
    for args, name, status, answer in results:
        if name is not None:
            assert 400 <= status < 500, (args, status, answer)
            # the processor's message names the argument; vLLM's own checks of `vllm_xargs` (its types, integers
            # beyond 64 bits) and the JSON parser's refusals name `extra_args` or `vllm_xargs`
            text = json.dumps(answer)
            assert any(word in text for word in (f"`{name}`", "extra_args", "vllm_xargs")), (args, status, text[:300])
            refused += 1
        else:
            assert status == 200, (args, status, answer)
            tokens = answer["choices"][0]["logprobs"]["tokens"]
            keep = args.get("s2t_keep")
            if keep is not None:  # ids beyond the vocabulary dropped; none left: the sentinel at once
                inside = {i for i in keep if i < vocab}
                first = answer["choices"][0]["logprobs"]["top_logprobs"][0]  # masked rows: -inf (vLLM writes -9999)
                top = {int(k.split(":")[1]) for k, v in first.items() if v > -9999.0}
                assert top <= inside if inside else tokens == [f"token_id:{sentinel}"], (args, top, tokens)
            accepted += 1
    assert refused > 100 and accepted > 100
    assert server.process.poll() is None  # never restarted
    assert decoded and all(tokens == expected for tokens in decoded)
    after = [c.token_ids for c in s2t.generate([list(p) for p in PROMPTS], max_new_tokens=NEW_TOKENS)]
    assert after == expected
    assert "Traceback" not in server.log_tail(400), server.log_tail(80)
    print(f"\n[fuzz] {len(results)} requests ({refused} refused, {accepted} accepted), {len(decoded)} S2T batches "
          f"decoded alongside, in {elapsed:.1f} s")
