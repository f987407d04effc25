"""A small JSON-over-HTTP client: one kept-alive connection per thread, retries with backoff, timeouts, and a thread
pool for concurrent requests.

It knows nothing of what it carries ([`~s2t_hf.teachers.RemoteTeacher`] speaks the vLLM protocol through it), but
one thing: an OpenAI-style completion whose choice ended with `finish_reason` `"abort"` or `"error"` is a request the
server dropped, not an answer (see [`dropped_request`]).
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar


__all__ = ["DEFAULT_MAX_RESPONSE_BYTES", "JSONClient", "ServerError", "dropped_request", "redact_url", "server_root"]

T = TypeVar("T")
R = TypeVar("R")

#: The largest answer a client reads (bytes): a teacher-forced request with `prompt_logprobs` over a few long
#: trajectories is a few MiB.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20
# the longest wait a server's `Retry-After` may ask for (seconds)
_MAX_RETRY_AFTER = 60.0


def redact_url(url: Any) -> Any:
    """`url` without the password of its `user:password@` part (`user:***@`), for messages; anything else as is."""
    if not isinstance(url, str):
        return url
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None and parsed.username is None:
        return url
    host = parsed.netloc.rsplit("@", 1)[1]
    user = f"{parsed.username}:***" if parsed.password is not None else "***"
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{user}@{host}"))


def server_root(base_url: Any) -> Any:
    """
    An http(s) `base_url` without its trailing `/` and `/v1` (the form OpenAI clients take), so that request paths
    such as `/v1/completions` can be appended; anything else as is, for the client's check.

    Examples:

    ```python
    >>> from s2t_hf.teachers.transport import server_root
    >>> server_root("http://127.0.0.1:8000/v1/"), server_root("https://host/api/")
    ('http://127.0.0.1:8000', 'https://host/api')

    ```
    """
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        return base_url
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


#: The `finish_reason`s of a completion the server ended without answering it: vLLM ends every request in flight with
#: `"abort"` (and no new token) when it shuts down or a client's request is cancelled, and with `"error"` when the
#: engine fails on it.
DROPPED_FINISH_REASONS = ("abort", "error")


def dropped_request(answer: Any) -> str | None:
    """
    Why `answer` (a decoded JSON answer) is a completion the server dropped rather than answered, or `None`: one of its
    `choices` ended with a `finish_reason` of `DROPPED_FINISH_REASONS`.

    Examples:

    ```python
    >>> from s2t_hf.teachers.transport import dropped_request
    >>> dropped_request({"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]})
    "the server ended the request without answering it (finish_reason 'abort' for choice 0)"
    >>> dropped_request({"choices": [{"index": 0, "text": "4", "finish_reason": "length"}]}) is None
    True

    ```
    """
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list):
        return None
    for position, choice in enumerate(choices):
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if reason in DROPPED_FINISH_REASONS:
            index = choice.get("index", position)
            return f"the server ended the request without answering it (finish_reason {reason!r} for choice {index})"
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (a number of seconds or an HTTP date), or `None`."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment is None:
            return None
        seconds = moment.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER) if seconds == seconds else None


class ServerError(RuntimeError):
    """
    A server could not be reached, or answered with an error.

    Args:
        message (`str`):
            What happened, and how to fix it.
        status (`int`, *optional*):
            The HTTP status of the server's answer, when it answered with an error.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class JSONClient:
    r"""
    JSON requests to one server over HTTP(S), from any number of threads.

    Each thread keeps its own connection alive between requests. A request that fails (no connection, timeout, HTTP
    5xx/429) is retried `max_retries` times with exponential backoff and jitter (each wait drawn in [0.5, 1.5) times
    the backoff, so that many threads do not retry in lockstep), or after the server's `Retry-After` when it is
    longer (at most 60 s); so is a completion the server dropped (see [`dropped_request`]: vLLM aborts the requests
    in flight when it shuts down); a kept-alive connection the server closed while idle is replaced at once, without
    counting as a try. Other HTTP errors (4xx) are raised at once. An answer longer than `max_response_bytes` is
    refused. A `user:password@` in `base_url` is sent as HTTP basic authentication (unless `api_key` is set) and never
    shown in messages.

    Args:
        base_url (`str`):
            The server's address, e.g. `"http://127.0.0.1:8000"`; request paths are appended to it.
        api_key (`str`, *optional*):
            Sent as `Authorization: Bearer <api_key>` when set.
        timeout (`float`, *optional*, defaults to 60.0):
            Seconds to wait for one answer.
        max_retries (`int`, *optional*, defaults to 3):
            Retries of a failed request.
        backoff (`float`, *optional*, defaults to 0.5):
            Seconds before the first retry; doubled at each further one.
        max_concurrency (`int`, *optional*, defaults to 32):
            Requests in flight at once in [`~JSONClient.map`].
        server_name (`str`, *optional*, defaults to `"server"`):
            How error messages name the server (`"The <server_name> at <base_url> ..."`).
        error_class (`type[ServerError]`, *optional*, defaults to `ServerError`):
            The error raised when the server cannot be reached or answers with an error.
        rejection_hint (`Callable[[str], str]`, *optional*):
            Given the text of a 4xx answer, a sentence appended to the error message (empty for none).
        max_response_bytes (`int`, *optional*, defaults to `DEFAULT_MAX_RESPONSE_BYTES` (256 MiB)):
            The longest answer read; a longer one raises `error_class`.

    Examples:

    ```python
    >>> from s2t_hf.teachers.transport import JSONClient, ServerError
    >>> client = JSONClient("http://127.0.0.1:9", timeout=0.5, max_retries=0)  # nothing listens on port 9
    >>> try:
    ...     client.request("GET", "/v1/models")
    ... except ServerError as error:
    ...     print(str(error)[:64])
    The server at http://127.0.0.1:9 did not answer `GET /v1/models`
    >>> client.close()

    ```
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_concurrency: int = 32,
        server_name: str = "server",
        error_class: type[ServerError] = ServerError,
        rejection_hint: Callable[[str], str] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"`base_url` must be an http(s) address such as 'http://127.0.0.1:8000', got {redact_url(base_url)!r}."
            )
        if not isinstance(max_response_bytes, int) or max_response_bytes < 1:
            raise ValueError(f"`max_response_bytes` must be a positive integer, got {max_response_bytes!r}.")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"`max_concurrency` must be a positive integer, got {max_concurrency!r}.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be a non-negative integer, got {max_retries!r}.")
        if timeout <= 0 or backoff < 0:
            raise ValueError(f"`timeout` must be positive and `backoff` non-negative, got {timeout} and {backoff}.")
        parsed = urllib.parse.urlsplit(base_url)
        #: The server's address as messages show it (without a password).
        self.base_url = redact_url(base_url)
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, parsed.port
        self._prefix = parsed.path
        self._basic_auth = None
        if parsed.username is not None:
            credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
            self._basic_auth = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.api_key = api_key
        self.max_response_bytes = max_response_bytes
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_concurrency = max_concurrency
        self.server_name = server_name
        self.error_class = error_class
        self.rejection_hint = rejection_hint
        #: Answers received (any HTTP status), retries included.
        self.requests = 0
        self._count_lock = threading.Lock()
        self._jitter = random.Random()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="s2t-teacher")

    def __repr__(self) -> str:
        return f"JSONClient(base_url={self.base_url!r})"

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = cls(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
        self._local.connection = None

    def _error(self, message: str, status: int | None = None) -> ServerError:
        return self.error_class(f"The {self.server_name} at {message}", status=status)

    def retry_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt` (1 for the first retry): the exponential backoff times a random
        factor in [0.5, 1.5), or the server's `Retry-After` when that is longer."""
        delay = self.backoff * 2 ** (attempt - 1) * (0.5 + self._jitter.random())
        return max(delay, retry_after) if retry_after is not None else delay

    def _read(self, response: http.client.HTTPResponse, method: str, path: str) -> bytes:
        """The answer's body, refused beyond `max_response_bytes`."""
        length = response.getheader("Content-Length")
        too_long = length is not None and length.isdigit() and int(length) > self.max_response_bytes
        data = b"" if too_long else response.read(self.max_response_bytes + 1)
        if too_long or len(data) > self.max_response_bytes:
            self._drop_connection()  # the rest of the answer is not read
            raise self._error(
                f"{self.base_url} answered `{method} {path}` with more than {self.max_response_bytes} bytes; "
                "raise `max_response_bytes` if the answer is expected to be that long."
            )
        return data

    def request(self, method: str, path: str, body: dict | None = None) -> Any:
        """
        One request with retries.

        Args:
            method (`str`):
                The HTTP method, e.g. `"GET"` or `"POST"`.
            path (`str`):
                The path after `base_url`, e.g. `"/v1/models"`.
            body (`dict`, *optional*):
                Sent as JSON.

        Returns:
            The decoded JSON answer.

        Raises:
            `error_class`: the server did not answer after `max_retries + 1` tries (a dropped completion counts as
            no answer), rejected the request (4xx), or answered with something that is not JSON.
        """
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self._basic_auth:
            headers["Authorization"] = self._basic_auth
        payload = json.dumps(body).encode() if body is not None else None
        cause = None
        attempt = 0
        retry_after = None
        waited = 0
        while attempt <= self.max_retries:
            if attempt > waited:  # once per counted try, not again after a replaced idle connection
                time.sleep(self.retry_delay(attempt, retry_after))
                waited = attempt
            reused = getattr(self._local, "connection", None) is not None
            try:
                connection = self._connection()
                connection.request(method, self._prefix + path, body=payload, headers=headers)
                response = connection.getresponse()
                data = self._read(response, method, path)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timeout, closed
                self._drop_connection()
                cause = f"{type(error).__name__}: {error}"
                retry_after = None
                if not (reused and isinstance(error, (ConnectionError, http.client.RemoteDisconnected))):
                    attempt += 1
                # a kept-alive connection the server closed while idle: try again at once on a new one
                continue
            with self._count_lock:
                self.requests += 1
            if response.status == 429 or response.status >= 500:
                cause = f"HTTP {response.status}: {data[:300].decode(errors='replace')}"
                retry_after = _retry_after(response.getheader("Retry-After"))
                attempt += 1
                continue
            if response.status >= 400:
                text = data[:500].decode(errors="replace")
                hint = self.rejection_hint(text) if self.rejection_hint is not None else ""
                raise self._error(
                    f"{self.base_url} rejected `{method} {path}` with HTTP {response.status}: {text}{hint}",
                    status=response.status,
                )
            try:
                answer = json.loads(data)
            except json.JSONDecodeError as error:
                raise self._error(
                    f"{self.base_url}{path} answered with something that is not JSON: {data[:200]!r}."
                ) from error
            dropped = dropped_request(answer)
            if dropped is None:
                return answer
            cause = dropped
            retry_after = None
            attempt += 1
        raise self._error(
            f"{self.base_url} did not answer `{method} {path}` after {self.max_retries + 1} tries ({cause}). Is it "
            "running and reachable? Check `base_url`, or raise `timeout` / `max_retries`."
        )

    def map(self, function: Callable[[T], R], items: list[T]) -> list[R]:
        """`[function(item) for item in items]`, run concurrently on the client's threads (in this thread for one
        item)."""
        if len(items) == 1:
            return [function(items[0])]
        return list(self._pool.map(function, items))

    def close(self) -> None:
        """Stops the request threads (their connections close with them)."""
        self._pool.shutdown(wait=False)
