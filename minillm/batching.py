"""Continuous batching for minillm.serve: one thread owns the model and steps a `DecodeBatch`; requests from
any number of HTTP threads join it between two steps and get their text back through a queue as it grows.

Why continuous batching: on a CPU or a GPU one decoding step for 8 sequences costs little more than for
one (the weights are read once per step either way), so every request that arrives while others decode
joins at the very next step instead of waiting for the whole batch to finish. A request over the batch
limit waits in arrival order for a row to free. A joining request is prefilled in one forward pass with the
others that arrived at the same time; during that pass the running rows wait (no chunked prefill).

Text is streamed safely: a piece is sent only once no later token can change it, so it never ends in half
a UTF-8 character and never holds the start of a stop string that the next tokens may complete (that
text is held back until the stop string is ruled out, and never sent when it is found).
"""
from __future__ import annotations

import queue
import threading
import traceback

from minillm.generate import DecodeBatch, Sequence


class Job:
    """One request in the engine: its Sequence and the queue its HTTP thread reads events from:
    ("text", piece) any number of times, then ("end", finish_reason) or ("error", message)."""

    def __init__(self, seq: Sequence, tokenizer):
        self.seq, self.tokenizer = seq, tokenizer
        self.events: queue.Queue = queue.Queue()
        self.sent = ""  # the text sent so far
        self.cancelled = False  # set by the HTTP thread when its client went away

    def cancel(self):
        self.cancelled = True


def held_back(text: str, stop_strings: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stop_strings:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def text_to_send(job: Job, final: bool) -> str:
    """The text of the job's tokens that is safe to send now and was not sent yet."""
    text = job.tokenizer.decode(job.seq.tokens)
    if not final:
        text = text.rstrip("\ufffd")  # the rest of a multi-byte character is still to come
        text = text[:len(text) - held_back(text, job.seq.stop_strings)]
    if not text.startswith(job.sent):  # a decoding that changed an earlier character: send nothing more
        return ""
    piece = text[len(job.sent):]
    job.sent = text if piece else job.sent
    return piece


class Engine:
    """The decoding thread. `submit(job)` from any thread; the job's events arrive on job.events."""

    def __init__(self, model, max_batch_size: int = 16):
        self.model, self.max_batch_size = model, max_batch_size
        self.batch = DecodeBatch(model)
        self.waiting: queue.Queue = queue.Queue()
        self.running: dict[int, Job] = {}  # id(job.seq) -> job
        self.thread = threading.Thread(target=self._run, name="minillm-decode", daemon=True)
        self.steps = self.tokens = 0  # decoding steps and tokens generated so far (/health shows them)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.waiting.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job):
        self.waiting.put(job)

    def _run(self):
        while True:
            joining = self._take_waiting(block=not self.running)
            if joining is None:
                return
            self._admit(joining)
            self._step()

    def _take_waiting(self, block: bool) -> list[Job] | None:
        """The waiting jobs that fit in the batch (waiting for one when nothing runs); None means stop."""
        jobs = []
        while len(self.running) + len(jobs) < self.max_batch_size:
            try:
                job = self.waiting.get(block=block and not jobs)
            except queue.Empty:
                break
            if job is None:
                return None
            if job.cancelled:
                job.events.put(("end", "cancelled"))
                continue
            jobs.append(job)
        return jobs

    def _admit(self, jobs: list[Job]):
        if not jobs:
            return
        try:
            self.batch.add([job.seq for job in jobs])
        except Exception as e:  # noqa: BLE001 -- out of memory, say: these requests fail, the server goes on
            self._fail(jobs, e)
            return
        self.running.update((id(job.seq), job) for job in jobs)

    def _step(self):
        for job in self.running.values():
            if job.cancelled:
                job.seq.finish("cancelled")
        try:
            events = self.batch.step()
        except Exception as e:  # noqa: BLE001 -- every running request fails; a fresh batch serves the next ones
            self._fail(list(self.running.values()), e)
            self.running.clear()
            self.batch = DecodeBatch(self.model)
            return
        self.steps += 1
        for seq, token in events:
            self.tokens += token is not None
            job = self.running[id(seq)]
            if job.cancelled:
                del self.running[id(seq)]
                job.events.put(("end", "cancelled"))
                continue
            piece = text_to_send(job, final=seq.done)
            if piece:
                job.events.put(("text", piece))
            if seq.done:
                del self.running[id(seq)]
                job.events.put(("end", seq.finish_reason))

    @staticmethod
    def _fail(jobs: list[Job], error: Exception):
        traceback.print_exception(error)  # the server's log keeps the detail; the client gets one line
        for job in jobs:
            job.events.put(("error", f"generation failed: {type(error).__name__}: {error}"[:500]))
