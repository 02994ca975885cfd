"""LLM-as-a-judge: reference-guided grading of generated answers by a model behind an OpenAI-compatible API.

As LLAMMAS evaluated QA and commonsense answers: string matching decides what it can (task modules say
which answers are decided, see qa.judge_items and multiple_choice.judge_items), and only the undecided
answers go to the judge, with the question, a reference answer and the model's answer filled into a prompt
(default: minillm/judge_prompt.txt, a reference-guided prompt in the spirit of MT-Bench's, whose verdict is
"[[CORRECT]]" or "[[INCORRECT]]" on its own).

- The endpoint: POST {url}/chat/completions (vLLM, llama.cpp's server, `python -m minillm.serve`, OpenAI),
  temperature 0. The API key comes from the environment variable MINILLM_JUDGE_API_KEY only (a flag would
  land in shell history and in results.json's settings).
- HTTP through the standard library: one request type, and the retries stay ours (the openai client retries
  on its own as well, which would multiply the attempts and hide them).
- Every judge answer is cached on disk, one file per (judge model, prompt hash, question, answer,
  reference), written atomically, so a rerun (or a crash halfway) costs nothing already paid for.
- Retries with exponential backoff on connection errors, timeouts, 408/409/429 and 5xx; other HTTP errors
  fail at once. At most `concurrency` requests in flight.
- An answer with no verdict, or with both, is off-format: counted and reported, never scored.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from minillm.files import atomic_write
from minillm.metrics import mean_stderr

DEFAULT_PROMPT = Path(__file__).with_name("judge_prompt.txt")
API_KEY_VARIABLE = "MINILLM_JUDGE_API_KEY"
PLACEHOLDERS = ("{question}", "{reference}", "{answer}")
PLACEHOLDER = re.compile(r"\{(question|reference|answer)\}")
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
VERDICT = re.compile(r"\[\[\s*(CORRECT|INCORRECT)\s*\]\]", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint could not be used (after retries, or a request it refuses)."""


@dataclass
class JudgeItem:
    """One answer to grade. string_verdict: True / False when string matching decided it (the judge is not
    asked), None when it goes to the judge."""
    question: str
    answer: str
    reference: str
    string_verdict: bool | None = None


def read_prompt(path: str | os.PathLike = "") -> str:
    """The judge prompt template ('' = the default), checked to hold {question}, {reference} and {answer}."""
    path = Path(path or DEFAULT_PROMPT)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the judge prompt ({e.strerror or e})") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{path}: the judge prompt lacks {', '.join(missing)} (it needs {', '.join(PLACEHOLDERS)})")
    return text


def parse_verdict(output: str) -> bool | None:
    """True for [[CORRECT]], False for [[INCORRECT]], None when the output has neither or both."""
    found = {m.upper() for m in VERDICT.findall(output or "")}
    return found == {"CORRECT"} if len(found) == 1 else None


class Judge:
    def __init__(self, url: str, model: str, cache_dir, prompt_path: str = "", concurrency: int = 4,
                 retries: int = 4, backoff_s: float = 1.0, timeout_s: float = 300, max_tokens: int = 512):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.cache_dir = model, Path(cache_dir)
        self.prompt = read_prompt(prompt_path)
        self.prompt_path = str(prompt_path or DEFAULT_PROMPT)
        self.prompt_sha256 = hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self.timeout_s, self.max_tokens = timeout_s, max_tokens

    def describe(self) -> dict:
        """What results carry about the judge."""
        return {"judge_model": self.model, "judge_prompt_sha256": self.prompt_sha256}

    def fill(self, item: JudgeItem) -> str:
        # one pass over the template, not str.format or chained replaces: the texts are free text and may
        # hold braces, or a placeholder's own spelling
        return PLACEHOLDER.sub(lambda m: getattr(item, m.group(1)), self.prompt)

    # ------------------------------------------------------------------ cache
    def _key(self, item: JudgeItem) -> dict:
        return {"judge_model": self.model, "judge_prompt_sha256": self.prompt_sha256, "question": item.question,
                "answer": item.answer, "reference": item.reference}

    def _cache_path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.json"

    def _cached(self, key: dict) -> str | None:
        try:
            entry = json.loads(self._cache_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, or unreadable: ask again (and overwrite it)
            return None
        if not isinstance(entry, dict) or {k: entry.get(k) for k in key} != key or not isinstance(entry.get("output"), str):
            return None
        return entry["output"]

    def _store(self, key: dict, output: str):
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({**key, "output": output}, ensure_ascii=False, indent=1) + "\n")

    # ------------------------------------------------------------------ HTTP
    def _ask(self, prompt: str) -> str:
        """The judge's reply to one prompt, retried with backoff on transient failures."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_VARIABLE):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_VARIABLE]}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else ""
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace").strip().splitlines()[:1]
                problem = f"HTTP {e.code}" + (f": {detail[0][:200]}" if detail else "")
                if e.code not in RETRYABLE_STATUS:
                    raise JudgeError(f"judge {self.url}: {problem}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = str(getattr(e, "reason", e))
            except (ValueError, KeyError, IndexError, TypeError):  # not an OpenAI chat completion
                problem = "the reply is not a chat completion (no choices[0].message.content)"
        raise JudgeError(f"judge {self.url}: no answer after {self.retries + 1} tries: {problem}")

    def _output(self, item: JudgeItem) -> tuple[str, bool]:
        """(the judge's output for the item, whether it came from the cache)."""
        key = self._key(item)
        cached = self._cached(key)
        if cached is not None:
            return cached, True
        output = self._ask(self.fill(item))
        self._store(key, output)
        return output, False

    # ------------------------------------------------------------------ grading
    def grade(self, items: list[JudgeItem]) -> tuple[dict, list[dict]]:
        """Grade every item: string-decided ones as they are, the others by the judge (identical items asked
        once). Returns (metrics, one record per item: {"judge_verdict": "correct" | "incorrect" |
        "off_format", "judged_by": "string" | "judge", "judge_output"?})."""
        undecided = list(dict.fromkeys((i.question, i.answer, i.reference) for i in items
                                       if i.string_verdict is None))
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            outputs = dict(zip(undecided, pool.map(lambda k: self._output(JudgeItem(*k)), undecided)))
        records, scores = [], []
        for item in items:
            if item.string_verdict is not None:
                verdict, record = item.string_verdict, {"judged_by": "string"}
            else:
                output, _ = outputs[(item.question, item.answer, item.reference)]
                verdict, record = parse_verdict(output), {"judged_by": "judge", "judge_output": output}
            record["judge_verdict"] = {True: "correct", False: "incorrect", None: "off_format"}[verdict]
            if verdict is not None:
                scores.append(float(verdict))
            records.append(record)
        sent = sum(r["judged_by"] == "judge" for r in records)
        off_format = sum(r["judge_verdict"] == "off_format" for r in records)
        metrics = {
            # accuracy over the answers with a verdict (string-decided or judged); off-format ones excluded
            "judge_acc": {"value": sum(scores) / len(scores) if scores else None, "n": len(scores),
                          "stderr": mean_stderr(scores), **self.describe()},
            "judge_off_format": {"value": off_format, "n": sent, **self.describe()},
            "judge_string_decided": {"value": len(items) - sent, "n": len(items)},
            "judge_cache_hits": {"value": sum(outputs[k][1] for k in undecided), "n": len(undecided)},
        }
        return metrics, records

