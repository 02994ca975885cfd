"""Shared test helpers: running the scripts as real subprocesses, reading their metrics, a small chat
tokenizer (sentencepiece, with the chat markers) for the template and SFT-data tests, tokenizer.json
tokenizers in the Llama-3 and Qwen2 layouts, and corpus files in every format for the corpus and prepare tests."""
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, args: list, nproc: int = 1, check: bool = True, popen: bool = False,
               env: dict | None = None):
    """`python SCRIPT ARGS` (one process) or `torchrun --standalone --nproc_per_node=N SCRIPT ARGS`; env: extra
    environment variables."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    cmd += [str(ROOT / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(out_dir, with_start: bool = False) -> list[dict]:
    """The JSON lines a run wrote to OUT_DIR/metrics.jsonl: one per optimizer step (with_start: also the step-0
    record, the validation before the first step)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if with_start or r["step"] > 0]


# Words and a conversation the chat tests render (the tokenizer below is trained on the words).
WORDS = ("the red cat dog Translate to Estonian English punane kass koer Mari elab Kivilas Kus tere maailm "
         "kõik hästi õun äri öö šokolaad žürii Below is an instruction that describes a task Write response "
         "appropriately completes request Instruction Input Response paired with provides further context "
         "And What colour has three cows Maril on kolm lehma").split()

THREE_TURNS = [
    {"role": "system", "content": "Ole abivalmis."},
    {"role": "user", "content": "Translate to Estonian: the red cat"},
    {"role": "assistant", "content": "punane kass"},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "koer"},
    {"role": "user", "content": "Kus elab Mari?"},
    {"role": "assistant", "content": "Mari elab Kivilas."},
]


def mask_runs(mask):
    """[(start, end)] of the maximal runs of 1s."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def random_text(rng) -> str:
    vocabulary = WORDS + ["12,50", "2024", "😀", "漢字", "a\nb", "  ", "x\ty", "Õ"]
    words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 8))]
    text = rng.choice([" ", "  ", ""]).join(words)
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", " ", "\n", "."])


def random_conversation(rng, end_with_assistant=True):
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return messages if end_with_assistant else messages[:-1]


def ids_with_markers(text: str, tok, markers=("<|system|>", "<|user|>", "<|assistant|>"), start=True) -> list[int]:
    """The oracle for a text in which the chat markers are meant as tokens: the text between them encoded
    as transformers encodes text after a special token (no dummy prefix), each marker one id; the text
    before the first marker as a text start (start=True) or as a continuation."""
    ids = []
    for i, chunk in enumerate(re.split("(" + "|".join(map(re.escape, markers)) + ")", text)):
        if chunk in markers:
            ids.append(tok.piece_to_id(chunk))
        elif chunk:
            ids += tok.encode(chunk) if i == 0 and start else tok.encode_continuation(chunk)
    return ids


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from minillm.tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer.train(iter(chat_lines()), tmp_path_factory.mktemp("tok") / "sp", 400)


# ----------------------------------------------------------------------------- tokenizer.json tokenizers
# Byte-level BPE tokenizers laid out as the real Hugging Face repos lay them out (tokenizer.json +
# tokenizer_config.json + generation_config.json), trained here with the `tokenizers` trainer.

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama-3.1's first special tokens (ids 128000...), then a few of its reserved ones.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"] + [
                   f"<|reserved_special_token_{i}|>" for i in range(3, 8)]
# Qwen2.5's added tokens start like this; <tool_call> is an added token that is not special.
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
               ("<tool_call>", False)]


def _byte_level_bpe(lines, vocab_size, pattern, *, ignore_merges, nfc):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(list(lines), trainer)
    return tok


def _added_tokens_decoder(tok) -> dict:
    return {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t.special}
            for i, t in sorted(tok.get_added_tokens_decoder().items())}


def write_llama3_tokenizer(directory, lines, vocab_size: int = 600, instruct: bool = True) -> Path:
    """A Llama-3.1 layout tokenizer directory: BOS <|begin_of_text|>; base EOS <|end_of_text|>, Instruct EOS
    <|eot_id|> with generation_config stopping on <|end_of_text|>, <|eom_id|> and <|eot_id|>."""
    from tokenizers import AddedToken, processors
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(lines, vocab_size, LLAMA3_PATTERN, ignore_merges=True, nfc=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, ids[bos])])])
    tok.save(str(directory / "tokenizer.json"))
    config = {"added_tokens_decoder": _added_tokens_decoder(tok), "bos_token": bos,
              "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
              "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]] if instruct else ids["<|end_of_text|>"]
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": ids[bos], "eos_token_id": eos}))
    return directory


def write_qwen2_tokenizer(directory, lines, vocab_size: int = 600, instruct: bool = True) -> Path:
    """A Qwen2.5 layout tokenizer directory: NFC, no BOS, <|im_start|>/<|im_end|>; base EOS <|endoftext|>,
    Instruct EOS <|im_end|> with generation_config stopping on <|im_end|> and <|endoftext|>."""
    from tokenizers import AddedToken, processors
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(lines, vocab_size, QWEN2_PATTERN, ignore_merges=False, nfc=True)
    tok.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in QWEN2_ADDED])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t, _ in QWEN2_ADDED}
    config = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": _added_tokens_decoder(tok),
              "bos_token": None, "clean_up_tokenization_spaces": False,
              "eos_token": "<|im_end|>" if instruct else "<|endoftext|>", "errors": "replace",
              "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]] if instruct else ids["<|endoftext|>"]
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]}))
    return directory


def chat_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Training text made of WORDS (what the chat tests render)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", "?", "!", ":", " ###"]) for _ in range(n)]


def paragraph_lines() -> list[str]:
    """chat_lines, and texts of several paragraphs (so byte-level BPE learns tokens of line breaks)."""
    pairs = zip(chat_lines(500, seed=1), chat_lines(500, seed=2))
    return chat_lines() + [a + "\n\n" + b + "\n" for a, b in pairs]


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    return write_llama3_tokenizer(tmp_path_factory.mktemp("llama3_tok"), paragraph_lines())


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return write_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tok"), paragraph_lines())


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small sample world (demo/sample_world.py), a tokenizer trained on it, its token shards, a random tiny
    model in Hugging Face layout and a finished 2-step pretraining run with checkpoints: inputs for the
    fault and bad-input tests."""
    sys.path.insert(0, str(ROOT / "demo"))
    import sample_world

    from minillm.corpora import iter_texts
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.prepare import prepare
    from minillm.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("tiny_world")
    sample_world.write_sample_world(root / "data", seed=0, scale=0.02)
    texts = list(iter_texts([root / f"data/pretrain/{lang}/train.jsonl" for lang in ("et", "en")]))
    tok = SentencePieceTokenizer.train(iter(texts), root / "tok" / "tokenizer", 400)
    tok.save_pretrained(root / "tok")
    for lang in ("et", "en"):
        for split in ("train", "valid"):
            prepare([root / f"data/pretrain/{lang}/{split}.jsonl"], root / "tok", root / f"shards/{lang}_{split}",
                    progress=False)
    import torch
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)), root / "init", tokenizer=tok)
    run_script("train_pretrain.py", pretrain_args(root, root / "run") + ["--max-steps", "2", "--save-interval", "1"])
    return root


def pretrain_args(world, out) -> list:
    """A tiny pretraining run on the tiny world's shards."""
    return ["--preset", "tiny", "--tokenizer", str(world / "tok"), "--data",
            f"et={world / 'shards/et_train'},en={world / 'shards/en_train'}", "--valid-data",
            f"et={world / 'shards/et_valid'}", "--eval-tokens", "64", "--seq-len", "32", "--micro-batch-size", "2",
            "--warmup-steps", "1", "--log-interval", "1", "--out-dir", str(out)]


def write_corpus(path, texts, field: str = "text", row_group_size: int = 4, zstd_frames: int = 1, **parquet_options):
    """Write `texts` as the corpus format its name says: .txt (one per line) / .jsonl (records {"id", field}),
    either optionally .gz / .zst (in `zstd_frames` frames), or .parquet (columns id, field; row groups of
    row_group_size rows; more pyarrow.parquet.write_table options). Written with the reference libraries
    (gzip, zstandard, pyarrow)."""
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=row_group_size,
                       **parquet_options)
        return path
    stem = name.removesuffix(".gz").removesuffix(".zst").removesuffix(".zstd")
    if stem.endswith((".jsonl", ".ndjson")):
        data = "".join(json.dumps({"id": i, field: t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    else:
        data = "".join(t + "\n" for t in texts)
    data = data.encode("utf-8")
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith((".zst", ".zstd")):
        import zstandard
        step = -(-len(data) // zstd_frames)
        data = b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))
    path.write_bytes(data)
    return path


def _sentences(rng, words, n_sentences):
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
                    for _ in range(n_sentences))


def save_tiny_llama(model_dir: Path, tokenizer_prefix: Path, texts: list[str], vocab_size: int) -> None:
    """A sentencepiece tokenizer trained on `texts` (its files at tokenizer_prefix.*) and a tiny random Llama with
    its output weights scaled up 25x (larger logits than the default init: scores of different continuations
    differ by more than noise), saved with the tokenizer in Hugging Face layout in model_dir (seed 0)."""
    import torch

    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer.train(iter(texts), tokenizer_prefix, vocab_size=vocab_size)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128,
                                          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))
    with torch.no_grad():
        model.output.weight.mul_(25)
    save_pretrained(model, model_dir, tokenizer=tokenizer)


def build_pretrain_world(root: Path) -> Path:
    """A tokenizer (root/tokenizer) and token shards (root/{et,en}_{train,valid}) for two 'languages', built from
    seeded random sentences: the world of the pretraining and resume tests."""
    from minillm.prepare import prepare
    from minillm.tokenizer import SentencePieceTokenizer

    rng = random.Random(0)
    et = "kass koer maja linn päike õun jõgi mägi tänav sõber väike suur ilus".split()
    en = "cat dog house town sun apple river hill street friend small big nice".split()
    texts = []
    for lang, words in (("et", et), ("en", en)):
        for split, n in (("train", 120), ("valid", 10)):
            with open(root / f"{lang}_{split}.jsonl", "w") as f:
                for _ in range(n):
                    texts.append(_sentences(rng, words, rng.randint(1, 6)))
                    f.write(json.dumps({"text": texts[-1]}) + "\n")
    tok = SentencePieceTokenizer.train(iter(texts), root / "tok", 400)
    tok.save_pretrained(root / "tokenizer")
    for lang in ("et", "en"):
        for split in ("train", "valid"):
            prepare([root / f"{lang}_{split}.jsonl"], root / "tokenizer", root / f"{lang}_{split}")
    return root
