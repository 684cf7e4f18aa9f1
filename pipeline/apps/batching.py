"""Concurrent chat requests generated together: one batched engine call answers many clients.

    scheduler = BatchScheduler(model, tokenizer)      # starts its thread
    job = scheduler.submit(Job(prompt_ids, max_new_tokens=64, sampling=settings, n=2, stop=["\\n"]))
    for event in job:                                 # Delta(choice, text, logprobs, finish_reason)
        ...
    scheduler.close()

Why: one request at a time leaves a CPU or GPU mostly idle, since a decoding step of one row
costs nearly what a step of sixteen does. The scheduler's thread waits for a request, collects
whatever else arrives within `window_s`, and generates all their rows (a request with n choices
is n rows) in one left-padded call of the generation engine (pipeline/models/generation.py).
Each row keeps its own settings and seed (`row_sampling`, `row_generators`), its own length and
stop sequences (the step callback finishes it), and a client that leaves finishes only its own rows.

No request waits for another to end (a 1-token request waited 4.3 s behind a 16-choice one when
a running call took no one in). A row can be resumed: the next call starts it from its prompt
and the tokens it has drawn, with its seeded generator where it stopped, so it draws what it
would have drawn uninterrupted. So once a call has run `min_turn_steps` steps and someone is
waiting (a new request, or rows left out of a full batch with a slot now free), it stops, and the
next call takes everyone's unfinished rows: joining costs one prefill of the running rows, paid
only when someone waits. A call holds at most `max_batch_rows` rows, dealt one per request in
turn, so a request of many choices gives up rows to a newcomer rather than fill the batch alone.

One request's failure is its own. A row whose text handling raises fails its request alone. When
a whole engine call raises (a prompt or settings that break the step: the NaN draw of temperature
1e-300 gave a 500 to 11 of the 24 requests batched with it), each request of the call is resumed
alone, and only one that fails alone gets the error; the others never see it.

Text is decoded here, one row at a time, as tokens come: a stop sequence ends its row as soon as
the decoded text holds it, and text that might still become a stop sequence (or is half of a
multi-byte character) is held back from the stream until it cannot.

Logprobs are the model's own: log softmax of the raw logits, before temperature, top-k and
top-p, as OpenAI reports them ("the log probability of this token"), so they do not change with
the sampling settings of the request.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.models.generation import Sampling, generate, seeded_generator

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


@dataclass
class Delta:
    """New output of one choice: text to append, logprob entries of its tokens, and maybe its end."""

    choice: int
    text: str
    logprobs: list[dict]
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the last delta of a choice: tokens generated, EOS included


@dataclass
class Job:
    """One chat completion request: a prompt, how to continue it, and where its output goes."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k likeliest
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """The client left: its rows stop at the next step."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Delta]:
        """Deltas until every choice has finished; raises what generation raised."""
        remaining = self.n
        while remaining:
            event = self.events.get()
            if isinstance(event, BaseException):
                raise event
            if event.finish_reason is not None:
                remaining -= 1
            yield event


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {byte: chr(byte) for byte in printable}, 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


class TokenText:
    """Each token's own text and bytes, as OpenAI's logprobs name them, cached by id.

    A byte-level BPE token may be part of a multi-byte character: its bytes are exact, its text
    is what those bytes decode to on their own.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        byte_level = type(decoder).__name__ == "ByteLevel"
        self.byte_decoder = {char: byte for byte, char in byte_symbols().items()} if byte_level else {}
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            symbol = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(symbol, str) and symbol and all(char in self.byte_decoder for char in symbol):
                raw = bytes(self.byte_decoder[char] for char in symbol)
                text = raw.decode("utf-8", errors="replace")
            else:
                text = self.tokenizer.decode([token_id])
                raw = text.encode("utf-8")
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]


class Row:
    """One choice being generated: its tokens, its text so far, and how much of it is sent.

    `tokens` are all it has drawn while unfinished, so prompt + tokens resumes it in a later call.
    """

    def __init__(self, job: Job, choice: int, generator: torch.Generator | None):
        self.job, self.choice = job, choice
        self.generator = generator  # a seeded request's own stream, carried from call to call
        self.tokens: list[int] = []
        self.starts: list[int] = []  # where each token's text starts in `text`
        self.entries: list[dict | None] = []  # logprob entry per token, when asked for
        self.text = ""
        self.sent_chars = 0
        self.sent_tokens = 0
        self.finish_reason: str | None = None
        self.generated = 0  # tokens drawn, EOS included


class BatchScheduler:
    """A thread that batches submitted jobs into engine calls; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        window_s: float = 0.005,
        max_batch_rows: int = 32,
        min_turn_steps: int = 4,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.window_s, self.max_batch_rows, self.min_turn_steps = window_s, max_batch_rows, min_turn_steps
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.token_text = TokenText(tokenizer)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.rows: list[Row] = []  # unfinished rows of the requests taken in, oldest request first
        self.isolated: list[Job] = []  # requests of a failed call, each to be run alone
        self.closing = False  # close() was called: finish what was taken in, then stop
        self.stopped = False  # the thread has ended: submit() refuses
        self.lock = threading.Lock()
        self.batch_sizes: list[int] = []  # rows per engine call, for tests and benchmarks
        self.thread = threading.Thread(target=self.run, name="chatpipe-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        with self.lock:
            if self.stopped:
                job.events.put(RuntimeError("the server is shutting down"))
            else:
                self.queue.put(job)
        return job

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    # -- scheduling ------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not (self.closing and not self.rows):
                try:
                    self.take_queued(wait=not self.rows and not self.closing)
                    for row in self.rows:
                        if row.finish_reason is None and row.job.cancelled.is_set():
                            row.finish_reason = "cancelled"
                    self.rows = [row for row in self.rows if row.finish_reason is None]
                    if self.rows:
                        self.run_call(self.choose_rows())
                except Exception as error:  # a fault of the scheduler itself: fail who is waiting, keep serving
                    logger.exception("chatpipe serve: the batch scheduler failed")
                    for job in self.jobs_of(self.rows):
                        self.fail(job, error)
                    self.rows = []
        finally:
            with self.lock:
                self.stopped = True
            while True:  # anything submitted after the last look is refused, never left waiting
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.events.put(RuntimeError("the server is shutting down"))

    def take_queued(self, wait: bool) -> None:
        """Take in queued requests: with `wait`, block for one and take what else comes within
        `window_s` (until the batch is full); else only what is queued now."""
        deadline = None
        if wait:
            if not self.take(self.queue.get()):
                return
            deadline = time.monotonic() + self.window_s
        while True:
            remaining = 0.0 if deadline is None or len(self.rows) >= self.max_batch_rows else deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                return
            if not self.take(job):
                return

    def take(self, job: Job | None) -> bool:
        """Add a request's rows; False for close()'s signal."""
        if job is None:
            self.closing = True
            return False
        device = self.model.device
        for choice in range(job.n):
            # Choice i of a seeded request draws from seed + i: choice 0 is what the seed gives alone.
            generator = seeded_generator((job.seed + choice) % 2**63, device) if job.seed is not None else None
            self.rows.append(Row(job, choice, generator))
        return True

    @staticmethod
    def jobs_of(rows: list[Row]) -> list[Job]:
        """The requests `rows` belong to, in order, each once (a Job is a dataclass: not hashable)."""
        return list({id(row.job): row.job for row in rows}.values())

    def choose_rows(self) -> list[Row]:
        """The next call's rows: a request being isolated, alone; else each request's next row in
        turn (oldest request first) up to `max_batch_rows`, so no request holds more than its share."""
        self.isolated = [job for job in self.isolated if any(row.job is job for row in self.rows)]
        if self.isolated:
            return [row for row in self.rows if row.job is self.isolated[0]][: self.max_batch_rows]
        return self.deal()

    def deal(self) -> list[Row]:
        """Up to `max_batch_rows` unfinished rows: the first of each request (oldest first), then the second..."""
        per_job: dict[int, list[Row]] = {}
        for row in self.rows:
            if row.finish_reason is None:
                per_job.setdefault(id(row.job), []).append(row)
        dealt = [row for turn in itertools.zip_longest(*per_job.values()) for row in turn if row is not None]
        chosen = {id(row) for row in dealt[: self.max_batch_rows]}
        return [row for row in self.rows if id(row) in chosen]

    def fail(self, job: Job, error: BaseException) -> None:
        """End a request with `error` (its client gets a 500); its other rows stop."""
        for row in self.rows:
            if row.job is job:
                row.finish_reason = "error"
        job.events.put(error)

    # -- generating ------------------------------------------------------------------------------

    def run_call(self, rows: list[Row]) -> None:
        alone = bool(self.isolated)
        jobs = self.jobs_of(rows)
        self.batch_sizes.append(len(rows))
        try:
            yielded = self.generate_rows(rows, may_yield=not alone)
        except Exception as error:
            if len(jobs) == 1:  # its own failure: only its client gets the 500, the server keeps serving
                logger.exception("chatpipe serve: a request of %d rows failed", len(rows))
                self.fail(jobs[0], error)
            else:  # whose failure? each request resumes alone; only one that fails alone gets it
                logger.warning("chatpipe serve: a call of %d requests failed (%r); running each alone", len(jobs), error)
                self.isolated += [job for job in jobs if all(job is not known for known in self.isolated)]
            return
        if not yielded:
            for row in rows:  # rows the engine stopped without our callback finishing them
                if row.finish_reason is None:
                    self.finish(row, "length")

    def generate_rows(self, rows: list[Row], may_yield: bool) -> bool:
        """One engine call over `rows`, each resumed where it is; True when it stopped early to let others in."""
        device = self.model.device
        contexts = [row.job.prompt_ids + row.tokens for row in rows]
        longest = max(len(context) for context in contexts)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, context in enumerate(contexts):
            input_ids[index, longest - len(context):] = torch.tensor(context, dtype=torch.long)
            mask[index, longest - len(context):] = 1
        row_sampling = [
            Sampling(row.job.sampling.temperature, row.job.sampling.top_p, row.job.sampling.top_k) for row in rows
        ]
        chosen = {id(row) for row in rows}
        left_out = [row for row in self.rows if id(row) not in chosen]
        step_logits: list[torch.Tensor] = []
        steps, yielded = 0, False

        def on_logits(logits: torch.Tensor, tokens: torch.Tensor) -> None:
            step_logits[:] = [logits]

        def on_tokens(tokens: torch.Tensor) -> torch.Tensor | bool:
            nonlocal steps, yielded
            wanted = [index for index, row in enumerate(rows) if row.finish_reason is None and row.job.top_logprobs is not None]
            entries = self.logprob_entries(step_logits[0], tokens, wanted) if wanted else {}
            done = torch.zeros(len(rows), dtype=torch.bool)
            for index, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if row.finish_reason is None:
                    try:
                        self.advance(row, token, entries.get(index))
                    except Exception as error:  # this row's text handling: its request fails, no other
                        logger.exception("chatpipe serve: a request failed while decoding its reply")
                        self.fail(row.job, error)
                done[index] = row.finish_reason is not None
            steps += 1
            if may_yield and steps >= self.min_turn_steps and not bool(done.all()) and self.others_waiting(rows, left_out):
                yielded = True
                return True
            return done

        generate(
            self.model, input_ids.to(device), mask.to(device),
            max_new_tokens=max(row.job.max_new_tokens - len(row.tokens) for row in rows),
            sampling=row_sampling[0], eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            on_tokens=on_tokens, row_sampling=row_sampling, row_generators=[row.generator for row in rows],
            on_logits=on_logits,
        )
        return yielded

    def others_waiting(self, rows: list[Row], left_out: list[Row]) -> bool:
        """Whether the next call would take a row this one lacks: a new request, when fewer requests
        than `max_batch_rows` are running (its first row is dealt one), or a left-out row dealt a
        slot freed here. With max_batch_rows=1 a call never stops for anyone: it would resume itself."""
        running_jobs = self.jobs_of([row for row in self.rows if row.finish_reason is None])
        if not self.queue.empty() and len(running_jobs) < self.max_batch_rows:
            return True
        if any(row.finish_reason is None for row in left_out):
            running = {id(row) for row in rows}
            return any(id(row) not in running for row in self.deal())
        return False

    def logprob_entries(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int]) -> dict[int, dict]:
        index = torch.tensor(rows, device=logits.device)
        log_probs = torch.log_softmax(logits[index].float(), dim=-1)
        chosen = log_probs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
        k = max(1, MAX_TOP_LOGPROBS)
        top_values, top_ids = log_probs.topk(min(k, log_probs.shape[-1]), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        entries = {}
        for position, row in enumerate(rows):
            text, raw = self.token_text(int(tokens[row]))
            entries[row] = {
                "token": text, "logprob": chosen[position], "bytes": raw,
                "top_logprobs": [
                    {"token": self.token_text(token_id)[0], "logprob": value, "bytes": self.token_text(token_id)[1]}
                    for token_id, value in zip(top_ids[position], top_values[position])
                ],
            }
        return entries

    def advance(self, row: Row, token: int, entry: dict | None) -> None:
        """Take one drawn token: end at EOS, a stop sequence or the row's length; send what is safe."""
        job = row.job
        row.generated += 1
        if job.cancelled.is_set():
            row.finish_reason = "cancelled"
            return
        if token == self.eos_id:
            self.finish(row, "stop")
            return
        row.starts.append(len(row.text))
        row.tokens.append(token)
        if entry is not None:
            entry = {**entry, "top_logprobs": entry["top_logprobs"][: job.top_logprobs]}
        row.entries.append(entry)
        row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if job.stop:
            # Only a stop sequence ending in the newest text can be new.
            search_from = max(0, row.starts[-1] - max(len(stop) for stop in job.stop))
            found = [at for at in (row.text.find(stop, search_from) for stop in job.stop) if at >= 0]
            if found:
                row.text = row.text[: min(found)]
                self.finish(row, "stop")
                return
        if len(row.tokens) >= job.max_new_tokens:
            self.finish(row, "length")
            return
        self.send(row, self.safe_length(row), None)

    def safe_length(self, row: Row) -> int:
        """How much of the text cannot change any more: not a half character, not a stop's start."""
        text = row.text
        end = len(text)
        while end > row.sent_chars and text[end - 1] == "\ufffd":
            end -= 1
        for stop in row.job.stop:
            for length in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:length]):
                    end = min(end, len(text[:end]) - length)
                    break
        return max(end, row.sent_chars)

    def finish(self, row: Row, reason: str) -> None:
        row.finish_reason = reason
        self.send(row, len(row.text), reason)

    def send(self, row: Row, up_to: int, finish_reason: str | None) -> None:
        text = row.text[row.sent_chars:up_to]
        # A token is sent with the text it starts in; the tokens cut off by a stop sequence are not.
        end_token = row.sent_tokens
        while end_token < len(row.tokens) and row.starts[end_token] < up_to:
            end_token += 1
        if finish_reason is not None and not row.job.stop:
            end_token = len(row.tokens)
        entries = [entry for entry in row.entries[row.sent_tokens:end_token] if entry is not None]
        if not text and not entries and finish_reason is None:
            return
        row.sent_chars, row.sent_tokens = up_to, end_token
        row.job.events.put(Delta(row.choice, text, entries, finish_reason,
                                 row.generated if finish_reason is not None else 0))
