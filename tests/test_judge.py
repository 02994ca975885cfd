"""LLM-as-a-judge (minillm.judge, evaluate.py --judge-*) against two servers:

- a live `minillm.serve` (in this process, on a free port) with a tiny model as the judge, driven end to end
  by evaluate.py: every undecided answer is sent, the tiny model's replies (which carry no verdict) are counted
  as off-format and never scored, results carry the judge model and the prompt's SHA-256, and a rerun with
  the server shut down gives the same results from the on-disk cache;
- a scripted stdlib http.server that answers with verdicts, prose without a verdict, both verdicts,
  transient 503s, a body that is not a chat completion, and persistent errors: retries, bounded concurrency,
  the API key from the environment, string matching first, atomic cache files.

Run: python -m pytest -q tests/test_judge.py
"""
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from conftest import chat_lines  # noqa: E402
from minillm.chat_format import chat_template_jinja  # noqa: E402
from minillm.hf import save_pretrained  # noqa: E402
from minillm.judge import API_KEY_VARIABLE, DEFAULT_PROMPT, Judge, JudgeError, JudgeItem, parse_verdict  # noqa: E402
from minillm.model import Llama, LlamaConfig  # noqa: E402
from minillm.serve import ServeOptions, build_server  # noqa: E402
from minillm.tokenizer import SentencePieceTokenizer  # noqa: E402

QA = [{"context": "Mari elab Tartus.", "question": "Kus Mari elab?", "answers": ["Tartus"]},
      {"context": "Koer on pruun.", "question": "Mis värvi on koer?", "answers": ["pruun"]},
      {"context": "The cat sat on the mat.", "question": "Where did the cat sit?", "answers": ["on the mat"]}]


def write_task(directory: Path, name: str, spec: dict, records) -> Path:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    path = directory / f"{name}.task.json"
    path.write_text(json.dumps({"name": name, "data": f"{name}.jsonl", **spec}))
    return path


# ----------------------------------------------------------------------------- a live minillm.serve judge

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(the tiny model's directory, the judge's base URL): the same tiny chat model is evaluated and judges."""
    root = tmp_path_factory.mktemp("judge_live")
    tok = SentencePieceTokenizer.train(iter(chat_lines() + [t["context"] for t in QA] * 5), root / "sp", 400)
    tok.chat_template = chat_template_jinja("tulu", tok)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                         max_seq_len=1024, eos_id=tok.eos_id, pad_id=tok.pad_id, bos_id=tok.bos_id)
    model = Llama(config)
    with torch.no_grad():  # larger weights than the training init, as in test_serve: replies of varied words
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        model.output.weight[[i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]] = 0
    save_pretrained(model, root / "model", tokenizer=tok)
    server = build_server(ServeOptions(model=str(root / "model"), port=0, name="tiny-judge", max_batch_size=8))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield root / "model", f"http://{host}:{port}/v1", server
    server.shutdown()
    server.server_close()


def test_evaluate_with_a_live_minillm_serve_judge(live, tmp_path, capsys):
    model_dir, url, server = live
    tasks = [write_task(tmp_path, "qa", {"type": "qa", "language": "et"}, QA),
             write_task(tmp_path, "mc_gen", {"type": "multiple_choice", "mode": "generate"},
                        [{"question": "What colour is snow?", "choices": ["white", "brown"], "label": 0}])]
    argv = ["--model", str(model_dir), "--tasks", *map(str, tasks), "--progress", "false", "--max-new-tokens", "4",
            "--judge-url", url, "--judge-model", "tiny-judge", "--judge-max-tokens", "12",
            "--judge-cache", str(tmp_path / "cache")]
    first = evaluate.main(argv + ["--out", str(tmp_path / "r1")])
    prompt_sha = hashlib.sha256(DEFAULT_PROMPT.read_bytes()).hexdigest()
    assert first["judge"] == {"url": url, "prompt": str(DEFAULT_PROMPT), "judge_model": "tiny-judge",
                              "judge_prompt_sha256": prompt_sha}
    rows = {(r["task"], r["metric"]): r for r in first["results"] if r.get("headline")}
    preds = [json.loads(x) for x in (tmp_path / "r1" / "predictions" / "qa.jsonl").read_text().splitlines()]
    sent = [p for p in preds if p["judged_by"] == "judge"]
    # string matching first: exact matches are never sent; everything else is, and got the model's own reply
    assert [p["judged_by"] == "string" for p in preds] == [p["exact_match"] == 1.0 for p in preds]
    assert sent and all(p["judge_output"].strip() for p in sent)
    # a random tiny model writes no verdict: every reply is off-format, counted, and none is scored
    assert all(parse_verdict(p["judge_output"]) is None and p["judge_verdict"] == "off_format" for p in sent)
    assert rows[("qa", "judge_off_format")]["value"] == len(sent) == rows[("qa", "judge_off_format")]["n"]
    assert rows[("qa", "judge_acc")]["n"] == len(preds) - len(sent)
    for metric in ("judge_acc", "judge_off_format"):
        assert rows[("qa", metric)]["judge_model"] == "tiny-judge"
        assert rows[("qa", metric)]["judge_prompt_sha256"] == prompt_sha
    assert ("mc_gen", "judge_off_format") in rows
    assert rows[("qa", "judge_cache_hits")]["value"] == 0
    assert "| qa | judge_off_format |" in (tmp_path / "r1" / "results.md").read_text()
    # the rerun asks nothing: the server is gone, every judgement comes from the cache
    server.shutdown()
    capsys.readouterr()
    second = evaluate.main(argv + ["--out", str(tmp_path / "r2")])
    rows2 = {(r["task"], r["metric"]): r for r in second["results"] if r.get("headline")}
    assert rows2[("qa", "judge_cache_hits")]["value"] == rows2[("qa", "judge_cache_hits")]["n"] > 0
    for key, row in rows.items():
        if key[1] != "judge_cache_hits":
            assert rows2[key]["value"] == row["value"], key
    assert (tmp_path / "r2" / "predictions" / "qa.jsonl").read_text() == \
        (tmp_path / "r1" / "predictions" / "qa.jsonl").read_text()


# ----------------------------------------------------------------------------- a scripted judge

class Scripted(BaseHTTPRequestHandler):
    """Answers by the answer text in the prompt ("ANSWER=<key>"): a list of replies, one per request, the last
    repeated. A reply is (status, body): a str is sent as a chat completion's content, bytes as they are."""
    protocol_version = "HTTP/1.1"
    script: dict = {}
    calls: dict = {}
    headers_seen: list = []
    in_flight = 0
    max_in_flight = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        key = prompt.split("ANSWER=")[1].split()[0]
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            n = cls.calls[key] = cls.calls.get(key, 0) + 1
            cls.headers_seen.append(self.headers.get("Authorization"))
        time.sleep(0.05)  # long enough for concurrent requests to overlap
        status, reply = cls.script[key][min(n, len(cls.script[key])) - 1]
        if isinstance(reply, str):
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                                "model": body["model"]})
        data = reply.encode() if isinstance(reply, str) else reply
        with cls.lock:
            cls.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    Scripted.calls, Scripted.headers_seen, Scripted.max_in_flight = {}, [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


OK = (200, "Same place as the reference.\n[[CORRECT]]")
WRONG = (200, "It names another city. [[INCORRECT]]")


def item(key: str, string_verdict=None) -> JudgeItem:
    return JudgeItem(question="Kus Mari elab?", answer=f"ANSWER={key} Tartus", reference="Tartus",
                     string_verdict=string_verdict)


def test_scripted_judge_retries_counts_off_format_and_bounds_concurrency(scripted, tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_VARIABLE, "sekret")
    Scripted.script = {
        "right": [OK], "wrong": [WRONG],
        "flaky": [(503, b'{"error": "overloaded"}'), (200, b"not json at all"), OK],  # retried twice, then right
        "prose": [(200, "I think the answer is fine.")],  # no verdict
        "both": [(200, "[[CORRECT]] or maybe [[INCORRECT]]")],  # two verdicts
        "lower": [(200, "verdict: [[ correct ]]")],  # the verdict, loosely written, still reads
        "decided": [OK],  # string matching decides it: must never be sent
    }
    judge = Judge(scripted, "judge-x", tmp_path / "cache", concurrency=2, retries=3, backoff_s=0.01)
    items = [item("right"), item("wrong"), item("flaky"), item("prose"), item("both"), item("lower"),
             item("decided", string_verdict=False), item("right")]  # the repeated item is asked once
    metrics, records = judge.grade(items)
    assert [r["judge_verdict"] for r in records] == ["correct", "incorrect", "correct", "off_format", "off_format",
                                                     "correct", "incorrect", "correct"]
    assert [r["judged_by"] for r in records] == ["judge"] * 6 + ["string", "judge"]
    assert Scripted.calls == {"right": 1, "wrong": 1, "flaky": 3, "prose": 1, "both": 1, "lower": 1}
    assert Scripted.max_in_flight == 2  # bounded, and used
    assert set(Scripted.headers_seen) == {"Bearer sekret"}
    # off-format answers are counted, never scored: judge_acc over the 6 answers with a verdict
    assert metrics["judge_acc"]["value"] == pytest.approx(4 / 6) and metrics["judge_acc"]["n"] == 6
    assert (metrics["judge_off_format"]["value"], metrics["judge_off_format"]["n"]) == (2, 7)
    assert metrics["judge_string_decided"]["value"] == 1
    assert metrics["judge_acc"]["judge_model"] == "judge-x"
    assert metrics["judge_acc"]["judge_prompt_sha256"] == hashlib.sha256(DEFAULT_PROMPT.read_bytes()).hexdigest()
    # the cache: one file per distinct judged item, complete JSON, no temp files left; a rerun sends nothing
    files = sorted((tmp_path / "cache").rglob("*"))
    cached = [f for f in files if f.is_file()]
    assert len(cached) == 6 and all(f.suffix == ".json" and not f.name.startswith(".") for f in cached)
    entry = json.loads(cached[0].read_text())
    assert set(entry) == {"judge_model", "judge_prompt_sha256", "question", "answer", "reference", "output"}
    calls = dict(Scripted.calls)
    metrics2, records2 = judge.grade(items)
    assert Scripted.calls == calls and records2 == records
    assert metrics2["judge_cache_hits"]["value"] == 6
    # another judge model, or another prompt, is another cache key
    other_prompt = tmp_path / "p.txt"
    other_prompt.write_text("Q {question}\nR {reference}\nA {answer}\nSay [[CORRECT]] or [[INCORRECT]].")
    Judge(scripted, "judge-y", tmp_path / "cache", backoff_s=0.01).grade([item("right")])
    Judge(scripted, "judge-x", tmp_path / "cache", prompt_path=other_prompt, backoff_s=0.01).grade([item("right")])
    assert Scripted.calls["right"] == 3


def test_scripted_judge_failures_are_one_clear_error(scripted, tmp_path):
    Scripted.script = {"down": [(500, b'{"error": "boom"}')], "refused": [(401, b'{"error": "bad key"}')]}
    judge = Judge(scripted, "judge-x", tmp_path / "cache", retries=2, backoff_s=0.01)
    with pytest.raises(JudgeError, match=r"no answer after 3 tries: HTTP 500"):
        judge.grade([item("down")])
    assert Scripted.calls["down"] == 3
    with pytest.raises(JudgeError, match=r"HTTP 401: .*bad key"):  # not retried
        judge.grade([item("refused")])
    assert Scripted.calls["refused"] == 1
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))
    dead = Judge("http://127.0.0.1:9/v1", "judge-x", tmp_path / "cache", retries=1, backoff_s=0.01)
    with pytest.raises(JudgeError, match="no answer after 2 tries"):
        dead.grade([item("anything")])


def test_parse_verdict_and_prompt_filling():
    assert parse_verdict("reasoning\n[[CORRECT]]") is True
    assert parse_verdict("[[INCORRECT]]") is False
    assert parse_verdict("[[CORRECT]] ... [[CORRECT]]") is True  # repeated, not contradictory
    assert parse_verdict("[[CORRECT]] [[INCORRECT]]") is None
    assert parse_verdict("CORRECT") is None and parse_verdict("") is None
    judge = Judge("http://x/v1", "m", "/nonexistent")
    filled = judge.fill(JudgeItem(question="Q {answer}?", answer="a {b}", reference="r"))
    assert "Q {answer}?" in filled and "a {b}" in filled  # braces in the texts are left alone
