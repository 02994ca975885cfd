"""minillm.serve against independent clients: the official `openai` Python client, raw HTTP for the requests
no client would send, and headless Chromium for the chat page. One tiny model, one live server (the real
command, in its own process) for the whole module.

Run: python -m pytest -q tests/test_serve.py

Oracles: minillm.generate in this process on the same weights (greedy tokens, and seeded samples, must be
identical through the server, alone or batched with others), the openai client's parsing of every answer,
chunk and error, and the page as a browser renders it.
"""
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from browser_chat import chat_on_page, find_chromium
from conftest import ROOT, chat_lines
from minillm.chat_format import chat_template_jinja, render
from minillm.generate import generate
from minillm.hf import load_pretrained, save_pretrained
from minillm.model import Llama, LlamaConfig
from minillm.serve import ServeOptions, build_server
from minillm.tokenizer import SentencePieceTokenizer, load_tokenizer

openai = pytest.importorskip("openai", reason="the official openai client is the oracle: pip install 'minillm[test]'")

NAME = "tiny-et"
QUESTIONS = ["Translate to Estonian: the red cat", "Kus elab Mari?", "What colour has the dog?", "tere maailm",
             "Maril on kolm lehma", "And the cat?", "Write a response", "kõik hästi"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, the model and tokenizer as minillm loads them, the server's stdout lines)."""
    root = tmp_path_factory.mktemp("serve")
    tok = SentencePieceTokenizer.train(iter(chat_lines()), root / "sp", 400)
    tok.chat_template = chat_template_jinja("tulu", tok)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                         max_seq_len=128, eos_id=tok.eos_id, pad_id=tok.pad_id)
    model = Llama(config)
    with torch.no_grad():  # larger weights than the training init: decisive greedy choices
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        # Byte pieces never win a greedy choice (logit 0 among larger ones): replies are whole words, so a stop
        # string picked from one is plain text, not half a character.
        model.output.weight[[i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("<0x")]] = 0
    save_pretrained(model, root / "model", tokenizer=tok)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minillm.serve", "--model", str(root / "model"), "--port", "0",
                             "--name", NAME, "--max-batch-size", "8"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "http://" in line:
            break
    url = re.search(r"http://\S+", "".join(lines))
    assert url, f"the server printed no URL: {lines}"
    yield url.group(0), load_pretrained(root / "model"), load_tokenizer(root / "model"), lines
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "v1", api_key="unused", max_retries=0, timeout=60)


def stops(tok) -> list[int]:
    """What ends a reply: every end id and every control token (chat markers included)."""
    return sorted({*tok.eos_ids, *tok.control_ids})


def chat_prompt(tok, question: str, system: str = "") -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return render(messages, tok, template="tulu", add_generation_prompt=True)[0]


def health(served) -> dict:
    with urllib.request.urlopen(served[0] + "health", timeout=10) as r:
        return json.loads(r.read())


def test_binds_loopback_prints_url_and_lists_the_model(served, client):
    url, _, _, lines = served
    assert url.startswith("http://127.0.0.1:"), lines
    assert "tulu" in "".join(lines)  # the chat layout it found
    assert [m.id for m in client.models.list().data] == [NAME]
    assert health(served)["status"] == "ok"


def test_chat_greedy_tokens_equal_generate(served, client):
    _, model, tok, _ = served
    prompt = chat_prompt(tok, "Translate to Estonian: the red cat", system="Ole abivalmis.")
    expected = generate(model, [prompt], max_new_tokens=40, eos_id=stops(tok))[0]
    answer = client.chat.completions.create(
        model=NAME, max_tokens=40, temperature=0,
        messages=[{"role": "system", "content": "Ole abivalmis."},
                  {"role": "user", "content": "Translate to Estonian: the red cat"}])
    assert answer.choices[0].message.content == tok.decode(expected)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == ("length" if len(expected) == 40 else "stop")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), len(expected))


def test_completion_and_streaming_equal_generate(served, client):
    _, model, tok, _ = served
    prompt = tok.encode("Mari elab Kivilas", bos=True)
    expected = tok.decode(generate(model, [prompt], max_new_tokens=30, eos_id=stops(tok))[0])
    answer = client.completions.create(model=NAME, prompt="Mari elab Kivilas", max_tokens=30, temperature=0)
    assert answer.choices[0].text == expected and answer.usage.prompt_tokens == len(prompt)
    pieces = list(client.completions.create(model=NAME, prompt="Mari elab Kivilas", max_tokens=30, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == expected
    assert len(pieces) > 2 and pieces[-1].choices[0].finish_reason in ("stop", "length")
    chat = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Kus elab Mari?"}],
                                               max_tokens=30, temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
    reply = generate(model, [chat_prompt(tok, "Kus elab Mari?")], max_new_tokens=30, eos_id=stops(tok))[0]
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == tok.decode(reply)
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == len(reply)


def test_stop_strings_end_the_reply_and_are_never_streamed(served, client):
    _, model, tok, _ = served
    for question in QUESTIONS:  # one whose reply is long enough to stop in its middle
        free = tok.decode(generate(model, [chat_prompt(tok, question)], max_new_tokens=40, eos_id=stops(tok))[0])
        if len(free) > 12:
            break
    stop = free[8:11]  # a stop string that starts mid-reply
    expected = free[:free.find(stop)]
    messages = [{"role": "user", "content": question}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0,
                                            stop=["never in the reply", stop])
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_eight_concurrent_streaming_clients_are_batched_and_each_gets_its_own_answer(served, client):
    _, model, tok, _ = served
    jobs = [dict(question=q, max_tokens=12 + 5 * i, temperature=0.0, seed=None) for i, q in enumerate(QUESTIONS)]
    jobs[3].update(temperature=1.0, seed=11)  # a seeded sample is the same in a batch as alone
    jobs[6].update(temperature=0.8, seed=5)
    expected = [tok.decode(generate(model, [chat_prompt(tok, j["question"])], max_new_tokens=j["max_tokens"],
                                    eos_id=stops(tok), temperature=j["temperature"], seed=j["seed"])[0])
                for j in jobs]
    got, errors = [None] * len(jobs), []
    before = health(served)

    def ask(i):
        try:
            time.sleep(0.005 * i)  # staggered: most arrive while others are decoding
            stream = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": jobs[i]["question"]}], stream=True,
                max_tokens=jobs[i]["max_tokens"], temperature=jobs[i]["temperature"], seed=jobs[i]["seed"])
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        except Exception as e:  # noqa: BLE001 -- reported below, with the others
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert got == expected
    after = health(served)
    tokens, steps = after["tokens_generated"] - before["tokens_generated"], after["decode_steps"] - before["decode_steps"]
    assert tokens > steps, (tokens, steps)  # so some steps decoded several requests at once


BAD_REQUESTS = [  # (path, body bytes, status, the parameter the error names)
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": [', 400, None),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("/v1/completions", b'["a list"]', 400, None),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "max_tokens": 2.5}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "temperature": 7}', 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "stop": 5}', 400, "stop"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "n": 2}', 400, "n"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "bogus": 1}', 400, "bogus"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": 12}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": [1, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "x", "max_tokens": 500}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "tiny-et", "prompt": "' + b"kass " * 400 + b'"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": [{"role": "user", "content": "'
     + b"kass " * 400 + b'"}]}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": "hello"}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": [{"role": "wizard", "content": "x"}]}', 400,
     "messages"),
    ("/v1/chat/completions", b'{"model": "tiny-et", "messages": [{"role": "user"}]}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ("/v1/chat/completions", b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
    ("/v1/nothing", b'{}', 404, None),
]


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS,
                         ids=[f"{i}-{b[:40].decode('utf-8', 'replace')}" for i, (_, b, _, _) in enumerate(BAD_REQUESTS)])
def test_every_bad_request_gets_its_4xx_in_openai_error_shape(served, path, body, status, param):
    got, answer = post(served[0].rstrip("/") + path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert "Traceback" not in error["message"]


def test_the_official_client_raises_its_own_errors_and_the_server_lives_on(served, client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    for method in ("GET", "PUT"):  # the wrong method, then a request line no HTTP client would send
        request = urllib.request.Request(served[0] + "v1/chat/completions", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 405 and "error" in json.loads(e.value.read())
    host, port = served[0].split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"\x00\xffGARBAGE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")  # an error status, not a dropped server
    assert health(served)["status"] == "ok"


def test_the_page_is_one_self_contained_file(served):
    with urllib.request.urlopen(served[0], timeout=10) as r:
        page = r.read().decode()
    assert "<script>" in page and "/v1/chat/completions" in page
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)  # nothing fetched from elsewhere
    assert not re.search(r"""fetch\(\s*["'](https?:)?//""", page)


@pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium): "
                                                    "the chat page is not tried in a browser")
def test_chat_page_in_headless_chromium_streams_the_reply(served, tmp_path):
    _, model, tok, _ = served
    expected = tok.decode(generate(model, [chat_prompt(tok, "Kus elab Mari?")], max_new_tokens=24,
                                   eos_id=stops(tok))[0])
    shown = chat_on_page(served[0], "Kus elab Mari?", tmp_path / "page.png", temperature=0, max_tokens=24)
    assert shown["model"] == NAME and shown["layout"] == "tulu", shown
    assert shown["reply"] == expected, shown["bubbles"]
    assert shown["updates"] > 3  # it grew piece by piece as the events came
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family, tokenizer_fixture, layout", [("qwen2", "qwen2_dir", "chatml"),
                                                               ("mistral", "llama3_dir", "llama3")])
def test_other_families_and_tokenizer_json_serve_their_own_layout(family, tokenizer_fixture, layout, request, tmp_path):
    """A Qwen2 model with a Qwen2.5-layout tokenizer.json (ChatML), a Mistral one with a Llama-3-layout one: the
    server finds the layout, stops at the layout's end-of-turn token, shows no control token as text."""
    tok = load_tokenizer(request.getfixturevalue(tokenizer_fixture))
    torch.manual_seed(1)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                              max_seq_len=128, family=family, attention_bias=family == "qwen2",
                              eos_id=tok.eos_id, pad_id=tok.pad_id))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
        # The layout's end-of-turn token is likely early: the reply must stop there, not show it.
        model.output.weight[tok.marker_id("<|im_end|>" if layout == "chatml" else "<|eot_id|>")] *= 3
    save_pretrained(model, tmp_path / "model", tokenizer=tok)
    server = build_server(ServeOptions(model=str(tmp_path / "model"), port=0, name="m"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.template == layout and server.server_address[0] == "127.0.0.1"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="-", max_retries=0)
        loaded, tok = load_pretrained(tmp_path / "model"), load_tokenizer(tmp_path / "model")
        reasons = []
        for question in ("Kus elab Mari?", "the red cat", "tere maailm"):
            prompt = render([{"role": "user", "content": question}], tok, template=layout, add_generation_prompt=True)[0]
            expected = generate(loaded, [prompt], max_new_tokens=24, eos_id=stops(tok))[0]
            answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                                    max_tokens=24, temperature=0)
            text = answer.choices[0].message.content
            assert text == tok.decode(expected) and "<|" not in text
            assert answer.usage.completion_tokens == len(expected)
            reasons.append(answer.choices[0].finish_reason)
        assert "stop" in reasons  # some reply did reach an end token, which was not shown
    finally:
        server.shutdown()
        server.server_close()
