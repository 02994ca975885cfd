"""Fault experiments: what a run does when the loss goes non-finite, a SIGTERM arrives on a step that also
saves, the disk fills up, a finished run is started again, a checkpoint holds a planted pickle, a stale
extension-build lock lies around, a task name points outside --out, a chat outgrows the context. Real
subprocesses on the tiny world (tests/conftest.py), a few seconds each.

    .venv/bin/python -m pytest -q tests/test_faults.py
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, pretrain_args, read_metrics, run_script

from minillm.monitor import StallWatch
from minillm.tokenizer import load_tokenizer


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def latest(out) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def finite_checkpoint(path) -> bool:
    """Every tensor of a ZeRO-0 checkpoint's model states is finite (test-side read of our own file)."""
    states = torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    return all(torch.isfinite(t).all() for t in states.values())


# ----------------------------------------------------------------------------- non-finite loss

def test_nonfinite_loss_stops_pretraining_before_saving_or_exporting(tiny_world, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_pretrain.py", pretrain_args(tiny_world, out) + [
        "--lr", "1e6", "--min-lr", "0", "--warmup-steps", "0", "--max-steps", "30", "--save-interval", "1",
        "--keep-checkpoints", "2"], check=False)
    line = error_line(proc)
    steps = [r["step"] for r in read_metrics(out)]
    bad = steps[-1] + 1  # the step whose loss was not finite is not logged
    assert f"step {bad}: the loss is nan" in line or f"step {bad}: the loss is inf" in line, line
    assert latest(out) == f"step_{bad - 1:07d}"  # the last finite state is kept, not rotated away
    for d in (out / "checkpoints").glob("step_*"):
        assert finite_checkpoint(d)
    assert not (out / "model").exists() and not (out / "checkpoints" / ".tmp").exists()


@pytest.mark.parametrize("script", ["train_sft.py", "train_orpo.py"])
def test_nonfinite_loss_stops_sft_and_orpo(tiny_world, tmp_path, script):
    """A model with one NaN weight (a damaged base): the first step's loss is NaN; the run stops there."""
    from minillm.hf import load_pretrained, save_pretrained
    from minillm.tokenizer import load_tokenizer
    model = load_pretrained(tiny_world / "init")
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = float("nan")
    save_pretrained(model, tmp_path / "broken", tokenizer=load_tokenizer(tiny_world / "init"))
    data = tiny_world / "data"
    files = {"train_sft.py": ["--train-data", data / "sft/alpaca_et.jsonl", "--valid-data", ""],
             "train_orpo.py": ["--train-data", data / "preferences/train.jsonl", "--valid-data", ""]}[script]
    proc = run_script(script, ["--init-from", tmp_path / "broken", *files, "--seq-len", "128", "--epochs", "1",
                               "--micro-batch-size", "4", "--save-interval", "1", "--out-dir", tmp_path / "run"],
                      check=False)
    line = error_line(proc)
    assert "step 1: the loss is nan" in line and "stopped without saving or exporting" in line
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()
    with_validation = {"train_sft.py": ["--valid-data", data / "sft/valid.jsonl"],
                       "train_orpo.py": ["--valid-data", data / "preferences/valid.jsonl"]}[script]
    proc = run_script(script, ["--init-from", tmp_path / "broken", *files, *with_validation, "--seq-len", "128",
                               "--epochs", "1", "--micro-batch-size", "4", "--out-dir", tmp_path / "run2"], check=False)
    assert "step 0: the initial model's validation loss is nan; stopped before training, nothing exported" in \
        error_line(proc)  # the step-0 validation is NaN: caught before the first step
    assert not (tmp_path / "run2" / "model").exists()


def test_a_collapsed_run_is_warned_of_once(tiny_world, tmp_path):
    """--lr 1e6 flattens the tiny model's output in one step: every later loss is ln(vocab) exactly and every
    gradient 0, finite throughout, so the NaN check passes. The zero gradient is said at its first step, the
    collapse after 20 steps at ln(vocab) past warmup; each once."""
    data = tiny_world / "data" / "sft" / "alpaca_et.jsonl"
    (tmp_path / "train.jsonl").write_text("".join(data.read_text().splitlines(keepends=True)[:50]))
    proc = run_script("train_sft.py", ["--init-from", tiny_world / "init", "--train-data", tmp_path / "train.jsonl",
                                       "--valid-data", "", "--seq-len", "128", "--epochs", "1", "--micro-batch-size",
                                       "1", "--lr", "1e6", "--min-lr", "1e5", "--warmup-steps", "2", "--log-interval",
                                       "100", "--out-dir", tmp_path / "run"])
    records = read_metrics(tmp_path / "run")
    vocab = load_tokenizer(tiny_world / "init").vocab_size
    first_zero = next(r["step"] for r in records if r["grad_norm"] == 0.0)
    at_uniform = [r["step"] for r in records if r["step"] > 2 and abs(r["loss"] - math.log(vocab)) < 0.01 * math.log(vocab)]
    assert len(records) >= 23 and at_uniform[:20] == list(range(3, 23)), at_uniform  # the collapse being warned of
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: step {first_zero}: the gradient norm is 0: no weight is learning (every weight "
                        "frozen, or no target token in the batch?)",
                        f"warning: step 22: the loss has stayed at {records[21]['loss']:.4f}, within 1% of "
                        f"ln(vocabulary) = {math.log(vocab):.4f} (a uniform prediction), for 20 steps after warmup: "
                        "the model has collapsed and is not learning (lower --lr?)"], warnings


def test_the_stall_watch_counts_only_consecutive_steps_after_warmup():
    """19 steps at ln(V), one step off, 19 more: no warning; a loss falling through ln(V) during warmup: none;
    ORPO's records are watched by their NLL, not by the loss that adds the odds-ratio term."""
    uniform = math.log(400)
    watch = StallWatch(400, warmup_steps=5)
    losses = [uniform] * 5 + [uniform * 1.005] * 19 + [uniform * 0.9] + [uniform] * 19
    assert [w for step, loss in enumerate(losses, 1) for w in watch.check({"step": step, "loss": loss})] == []
    assert watch.check({"step": 45, "loss": uniform}) != []  # the 20th consecutive step
    orpo = StallWatch(400, warmup_steps=0, patience=2)
    assert orpo.check({"step": 1, "loss": uniform + 0.7, "nll": uniform}) == []
    assert len(orpo.check({"step": 2, "loss": uniform + 0.7, "nll": uniform})) == 1


# ----------------------------------------------------------------------------- SIGTERM on a saving step

@pytest.mark.slow
def test_sigterm_on_a_saving_step_saves_it_once_and_resumes(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--max-steps", "400", "--save-interval", "1", "--keep-checkpoints", "2"]
    proc = run_script("train_pretrain.py", args, popen=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    stopped = read_metrics(out)[-1]["step"]
    assert f"SIGTERM: saved step {stopped}" in output
    assert latest(out) == f"step_{stopped:07d}"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["latest", f"step_{stopped - 1:07d}", f"step_{stopped:07d}"]  # saved once: nothing rotated twice
    state = json.loads((out / "checkpoints" / f"step_{stopped:07d}" / "trainer_state.json").read_text())
    assert state["step"] == stopped
    run_script("train_pretrain.py", args[:-6] + ["--max-steps", str(stopped + 2), "--resume"])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 3))


@pytest.fixture
def one_process_group():
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine: it writes ZeRO-0's one file per save and counts the saves."""

    def __init__(self):
        self.device, self.saves = torch.device("cpu"), []
        self.module = torch.nn.Linear(2, 2)

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, save_latest):
        self.saves.append(tag)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def test_save_replaces_checkpoints_without_a_missing_latest(one_process_group, tmp_path, monkeypatch):
    """A step is saved once; whenever a directory is deleted, `latest` names another one that exists."""
    import shutil

    from minillm import checkpoints
    engine, root = FakeEngine(), tmp_path / "checkpoints"
    real_rmtree = shutil.rmtree

    def watched_rmtree(path, *a, **kw):
        if (root / "latest").exists() and Path(path).parent == root:
            named = root / (root / "latest").read_text().strip()
            assert Path(path) != named and named.is_dir(), f"deleting {path} while latest names {named}"
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", watched_rmtree)
    for step in (1, 2, 2, 3, 3, 4):  # the repeated steps: a SIGTERM on a step that was saved already
        checkpoints.save_checkpoint(engine, tmp_path, step, {"step": step}, keep=2)
        assert latest(tmp_path) == f"step_{step:07d}"
    assert engine.saves == [f"step_{s:07d}" for s in (1, 2, 3, 4)]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003", "step_0000004"]
    (root / "step_0000005").mkdir()  # a leftover that `latest` does not name (a run killed before its rename)
    checkpoints.save_checkpoint(engine, tmp_path, 5, {"step": 5}, keep=2)
    assert latest(tmp_path) == "step_0000005" and (root / "step_0000005" / "mp_rank_00_model_states.pt").exists()


# ----------------------------------------------------------------------------- a full disk

def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "inject_fault.py"), "enospc", "2", str(ROOT / "train_pretrain.py"),
           *pretrain_args(tiny_world, out), "--max-steps", "6", "--save-interval", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = error_line(proc)
    assert "cannot write checkpoint" in line and "step_0000003" in line and "no space left on device" in line
    assert "GiB free" in line and "the previous one (step_0000002) and 'latest' are intact" in line
    assert latest(out) == "step_0000002" and finite_checkpoint(out / "checkpoints" / "step_0000002")
    assert not (out / "checkpoints" / ".tmp").exists() and not (out / "checkpoints" / "step_0000003").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_full_disk_at_the_first_checkpoint_says_there_is_none(tiny_world, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests" / "inject_fault.py"), "enospc", "0", str(ROOT / "train_pretrain.py"),
           *pretrain_args(tiny_world, out), "--max-steps", "3", "--save-interval", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = error_line(proc)
    assert "step_0000001" in line and "there is no earlier checkpoint of this run" in line and "intact" not in line
    assert not (out / "checkpoints" / "latest").exists()


# ----------------------------------------------------------------------------- resuming what is there

def test_resume_with_nothing_left_to_do_says_so_and_touches_no_file(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--save-interval", "2"]
    run_script("train_pretrain.py", args + ["--max-steps", "4"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_script("train_pretrain.py", args + ["--max-steps", "2", "--resume"])
    assert "nothing to do: the checkpoint is at step 4 >= --max-steps 2" in proc.stdout
    assert "SIGTERM" not in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_without_latest_continues_from_the_newest_checkpoint(tiny_world, tmp_path):
    """A kill between a checkpoint's rename and the first write of `latest` leaves complete step_N directories
    and no `latest`: the resume continues from the newest, never from step 0 over them."""
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--save-interval", "2"]
    run_script("train_pretrain.py", args + ["--max-steps", "4"])
    (out / "checkpoints" / "latest").unlink()
    proc = run_script("train_pretrain.py", args + ["--max-steps", "6", "--resume"])
    assert "latest is missing; resuming from the newest complete checkpoint, step_0000004" in proc.stdout
    assert "resumed from step 4" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))


# ----------------------------------------------------------------------------- re-running a finished run

@pytest.mark.slow
def test_rerun_is_refused_and_overwrite_starts_afresh(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--max-steps", "2"]
    run_script("train_pretrain.py", args)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = error_line(run_script("train_pretrain.py", args, check=False))
    assert "holds a run already" in line
    bad = run_script("train_pretrain.py", args + ["--overwrite", "--mixture", "et=1,fr=1"], check=False)
    assert "fr" in error_line(bad)  # a failed start: nothing of the old run is touched
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    run_script("train_pretrain.py", args[:-2] + ["--max-steps", "3", "--overwrite"])
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # no lines of the old run
    assert json.loads((out / "options.json").read_text())["max_steps"] == 3
    assert json.loads((out / "model" / "training_state.json").read_text())["step"] == 3
    assert "--resume" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------- unpickling on resume

def test_planted_pickle_is_refused_on_resume(tiny_world, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(tiny_world / "run", out)
    states = out / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    payload = (f"import torch, os\nclass E:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
               f"sd = torch.load({str(states)!r}, weights_only=False)\nsd['x'] = E()\ntorch.save(sd, {str(states)!r})\n")
    subprocess.run([sys.executable, "-c", payload], check=True)
    proc = run_script("train_pretrain.py", pretrain_args(tiny_world, out) + ["--max-steps", "3", "--resume"],
                      check=False)
    line = error_line(proc)
    assert "refused to load" in line and "posix.system" in line and not marker.exists()


# ----------------------------------------------------------------------------- a stale build lock

def test_a_stale_extension_lock_does_not_hang_a_start(tiny_world, tmp_path):
    """A start killed while DeepSpeed built its CPU extension leaves a lock file; minillm never builds it."""
    ext = tmp_path / "extensions"
    for name in ("deepspeed_shm_comm", "py311_cpu/deepspeed_shm_comm"):
        (ext / name).mkdir(parents=True)
        (ext / name / "lock").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "train_pretrain.py"), *pretrain_args(tiny_world, tmp_path / "r"),
                           "--max-steps", "1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built successfully" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- evaluate

def test_task_names_cannot_write_outside_out(tiny_world, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.jsonl").write_text(json.dumps({"text": "tere maailm"}) + "\n")
    (tasks / "t.task.json").write_text(json.dumps({"name": "../../escape", "type": "perplexity", "data": "t.jsonl"}))
    out = tmp_path / "deep" / "er" / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(tiny_world / "init"), "--tasks",
                           str(tasks), "--out", str(out), "--progress", "false"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "tasks" not in p.parts)
    assert all(w.startswith("deep/er/results/") for w in written), written
    assert (out / "predictions" / "escape.jsonl").exists()


# ----------------------------------------------------------------------------- chat

def test_chat_keeps_answering_past_the_context(tiny_world, tmp_path):
    """A model with a 64-token context, the default --max-new-tokens 256 and a conversation that outgrows the
    context: every turn is answered, and the dropping of old turns is said once."""
    from minillm.hf import load_pretrained, save_pretrained
    from minillm.tokenizer import load_tokenizer
    model = load_pretrained(tiny_world / "init")
    model.config.max_seq_len = 64
    save_pretrained(model, tmp_path / "short", tokenizer=load_tokenizer(tiny_world / "init"))
    turns = "".join(f"Tere, kuidas läheb? Räägi mulle linnast number {i}.\n" for i in range(6))
    proc = subprocess.run([sys.executable, "-m", "minillm.chat", "--model", str(tmp_path / "short"), "--temperature",
                           "0"], input=turns, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("outgrew the model's context of 64 tokens") == 1


def test_chat_reads_a_line_that_is_not_utf8_and_says_so(tiny_world):
    proc = subprocess.run([sys.executable, "-m", "minillm.chat", "--model", str(tiny_world / "init"),
                           "--temperature", "0", "--max-new-tokens", "4"],
                          input=b"Tere \xff\xfe maailm\nTere\n", capture_output=True, timeout=300, cwd=ROOT)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.count("not valid UTF-8") == 1


def test_chat_in_a_terminal_says_what_it_runs_and_takes_multiline_messages(tiny_world):
    """On a terminal (a pty): a banner names the model, its chat layout and the commands; the backend line of the
    first forward pass comes before "model> ", not inside the reply; a \"\"\" block is one message (one reply);
    --help lists the commands."""
    import pty  # noqa: F401 - Linux/macOS only, like the chat's terminal handling
    import select
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "minillm.chat", "--model", str(tiny_world / "init"), "--temperature",
                             "0", "--max-new-tokens", "3"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    os.write(master, b'"""\nTere\nmaailm\n"""\n/quit\n')
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        try:
            chunk = os.read(master, 4096) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert f"{tiny_world / 'init'}: llama model, chat layout 'tulu', context" in text and "/reset" in text, text
    assert text.count("model> ") == 1 and text.index("attention: ") < text.index("model> "), text  # one reply
    help_text = subprocess.run([sys.executable, "-m", "minillm.chat", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120).stdout
    assert "/reset clears the history, /quit (or Ctrl-D) leaves" in help_text and "three double quotes" in help_text


def test_fit_context_drops_the_oldest_turns_and_caps_the_reply(tiny_world):
    from minillm.chat import MIN_REPLY_TOKENS, fit_context
    from minillm.chat_format import render
    from minillm.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_world / "init")
    system = [{"role": "system", "content": "Ole lühike."}]
    turns = []
    for i in range(8):
        turns += [{"role": "user", "content": f"Räägi mulle linnast number {i}."},
                  {"role": "assistant", "content": f"Linn {i} on väike ja ilus."}]
    messages = system + turns + [{"role": "user", "content": "Ja viimane?"}]
    prompt, budget, dropped = fit_context(messages, tok, 96, 256)
    assert dropped > 0 and len(prompt) <= 96 - MIN_REPLY_TOKENS and budget == 96 - len(prompt)
    kept = system + (turns + [messages[-1]])[2 * dropped:]  # whole user/assistant pairs left out, oldest first
    assert prompt == render(kept, tok, add_generation_prompt=True)[0]
    short, budget, dropped = fit_context(system + turns[:2] + [messages[-1]], tok, 96, 10)
    assert dropped == 0 and budget == 10  # room enough: nothing dropped, the asked-for budget


def test_a_torn_last_metrics_line_is_dropped_and_damage_elsewhere_is_named(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--save-interval", "2"]
    run_script("train_pretrain.py", args + ["--max-steps", "2"])
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 4.')  # killed while writing step 3's line
    proc = run_script("train_pretrain.py", args + ["--max-steps", "3", "--resume"])
    assert f"warning: {metrics}:" in proc.stdout and "torn last line" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[1:]]) + "\n")  # damage in the middle
    proc = run_script("train_pretrain.py", args + ["--max-steps", "4", "--resume"], check=False)
    line = error_line(proc)
    assert f"{metrics}:2: damaged" in line


@pytest.mark.parametrize("script", ["train_sft.py", "train_orpo.py"])
def test_resume_on_other_data_is_refused_unless_allowed_and_then_recorded(tiny_world, tmp_path, script):
    """A checkpoint records size, mtime and sha256 of every data file; a resume whose files differ (another
    file, or the same name with other contents) is one line naming the file, unless --allow-data-change."""
    import shutil
    source = tiny_world / "data" / {"train_sft.py": "sft/alpaca_et.jsonl",
                                    "train_orpo.py": "preferences/train.jsonl"}[script]
    train = tmp_path / "train.jsonl"
    shutil.copy(source, train)
    out = tmp_path / "run"
    args = ["--init-from", tiny_world / "init", "--train-data", train, "--valid-data", "", "--seq-len", "128",
            "--micro-batch-size", "4", "--save-interval", "1", "--out-dir", out]
    run_script(script, args + ["--epochs", "1"])
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records in another order
    options = (out / "options.json").read_bytes()
    proc = run_script(script, args + ["--epochs", "2", "--resume"], check=False)
    line = error_line(proc)
    assert str(train) in line and "its contents changed" in line and "--allow-data-change" in line
    assert (out / "options.json").read_bytes() == options  # nothing rewritten
    proc = run_script(script, args + ["--epochs", "2", "--resume", "--allow-data-change"])
    assert "warning: --allow-data-change" in proc.stdout
    state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
                        / "trainer_state.json").read_text())
    assert state["data_changes"] and state["data_changes"][0]["files"] == [str(train)]
    assert state["data"][str(train)]["sha256"] and json.loads((out / "options.json").read_text())["allow_data_change"]


def test_ctrl_c_saves_at_the_step_end_and_a_second_leaves_at_once(tiny_world, tmp_path):
    for presses in (1, 2):
        out = tmp_path / f"run{presses}"
        args = pretrain_args(tiny_world, out) + ["--max-steps", "400", "--save-interval", "100"]
        proc = run_script("train_pretrain.py", args, popen=True)
        deadline = time.time() + 240
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2):
            time.sleep(0.05)
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
        output, _ = proc.communicate(timeout=240)
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
        if presses == 1:
            stopped = read_metrics(out)[-1]["step"]
            assert proc.returncode == 0 and "Ctrl-C: saving at the end of this step" in output
            assert f"SIGINT: saved step {stopped}" in output and latest(out) == f"step_{stopped:07d}"
        else:
            assert proc.returncode == 130 and output.strip().endswith("interrupted"), output[-2000:]


def test_a_second_run_into_the_same_directory_is_refused_and_a_stale_lock_is_taken_over(tiny_world, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(tiny_world, out) + ["--max-steps", "400", "--save-interval", "100"]
    first = run_script("train_pretrain.py", args, popen=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 1):
            time.sleep(0.05)
        second = run_script("train_pretrain.py", args + ["--resume"], check=False)
        line = error_line(second)
        assert f"in use by another run (process {first.pid}" in line and ".lock" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
    assert not (out / ".lock").exists()  # released at exit
    # a lock left by a process that no longer runs (kill -9): taken over, said
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    proc = run_script("train_pretrain.py", args[:-4] + ["--max-steps", "2", "--overwrite"])
    assert f"removed the stale lock of process {dead.pid}" in proc.stdout
    # a start that fails before writing anything leaves no directory behind
    proc = run_script("train_pretrain.py", pretrain_args(tiny_world, tmp_path / "new") + ["--seq-len", "100000"],
                      check=False)
    assert "max_seq_len" in error_line(proc) and not (tmp_path / "new").exists()


EXIT_SCRIPT = """
import atexit, sys, torch, deepspeed
from pathlib import Path
from minillm.engine import exit_distributed, setup_distributed
from minillm.files import lock_directory
rank, world_size, device = setup_distributed(0)
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
out = Path(sys.argv[1])
if rank == 0:
    lock_directory(out / "run")
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))
print(f"rank {rank} done", end="")  # no newline: still buffered when the process ends
exit_distributed()
print("after exit_distributed")
"""


def test_exit_distributed_ends_every_rank_cleanly_after_the_exit_handlers(tmp_path):
    """The scripts' last call leaves the group and ends the process with os._exit (DeepSpeed keeps a gloo
    group alive that nothing can release; its threads at interpreter teardown aborted a rank now and then):
    exit status 0 on both ranks, buffered output flushed, atexit handlers run (the run directory's lock is
    released there), and nothing after the call runs."""
    script = tmp_path / "exit_script.py"
    script.write_text(EXIT_SCRIPT)
    proc = run_script(script, [tmp_path], nproc=2)
    assert proc.returncode == 0
    assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout and "after exit_distributed" not in proc.stdout
    assert (tmp_path / "atexit0").read_text() == (tmp_path / "atexit1").read_text() == "ran"
    assert not (tmp_path / "run" / ".lock").exists()
