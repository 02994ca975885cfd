"""Model merging, streamed: `python -m minillm.merge` writes linear, task-arithmetic or chat-vector merges.

Methods (every input a Hugging Face directory of a family minillm loads: Llama, Mistral, Qwen2):
  linear           sum_i w_i * model_i / sum_i w_i                 (--models A B ..., --weights)
  task_arithmetic  base + sum_i w_i * (model_i - base)             (--base, --models, --weights)
  chat_vector      target + w * (instruct - base)                  (--target, --instruct, --base, --weights w)
                   the chat vector of Huang et al. 2024: the instruct model's difference from its base, added
                   to a model continually pretrained from that base.
linear and task_arithmetic are mergekit's methods of those names (normalize: true for linear, false for
task_arithmetic; tests check the result against mergekit tensor for tensor).

Streaming: tensors are read straight from the safetensors files (header parsed here, data read with plain
reads, never memory-mapped, never unpickled) in blocks of rows, combined in float64 and written into the
output shard at once, so memory stays at one block per input whatever the model size (an 8B merge fits a
small machine; bench/bench_merge.py measures the peak).

Vocabulary extension (chat_vector): a target whose vocabulary was extended (minillm.vocab) has more rows in
the embedding and output matrices than instruct and base. The vector is added to the shared rows, and the
new rows keep the target's values. The shared rows must stand for the same tokens: the tokenizers' token
texts are compared, and a mismatch stops the merge with one line naming the first differing id.

Output: sharded safetensors (--max-shard-size), the config.json of the model the tokenizer comes from
(--tokenizer-from; default the target, else the first model), with torch_dtype set, and that model's tokenizer
files and chat template copied verbatim. Written into a temporary directory and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from minillm.files import atomic_write
from minillm.hf import (
    INDEX_FILE, SINGLE_FILE, _move_into, _plan_shards, _weight_files, parse_size, read_config, safetensors_header,
)
from minillm.options import OptionError, cli, parse_options
from minillm.tokenizer import load_tokenizer

METHODS = ("linear", "task_arithmetic", "chat_vector")
FROM_SAFETENSORS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What is copied beside the weights from the --tokenizer-from model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tekken.json")
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # the tensors whose rows are tokens
BLOCK_BYTES = 64 * 2**20  # float64 bytes of one output block: what one input holds in memory at a time


class SafetensorsFile:
    """One .safetensors file read with plain reads: header parsed once, any rows of a tensor read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        self.data_start = 8 + size
        self.tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or info.get("dtype") not in FROM_SAFETENSORS:
                raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                                 f"minillm.merge reads {', '.join(FROM_SAFETENSORS)}")
            self.tensors[name] = (FROM_SAFETENSORS[info["dtype"]], tuple(info["shape"]), info["data_offsets"][0])
        self.file = open(path, "rb")

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of tensor `name` (along its first dimension; a 0-d tensor is one row), as float64."""
        dtype, shape, offset = self.tensors[name]
        row = int(torch.Size(shape[1:]).numel()) * dtype.itemsize
        self.file.seek(self.data_start + offset + start * row)
        data = bytearray((stop - start) * row)
        if self.file.readinto(data) != len(data):
            raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return torch.frombuffer(data, dtype=dtype).to(torch.float64).reshape((stop - start, *shape[1:]) if shape else ())


class Model:
    """A Hugging Face directory's tensors: name -> (file, dtype, shape)."""

    def __init__(self, path):
        self.path = Path(path)
        read_config(self.path)  # a model directory minillm loads: its config.json names a supported family
        files = {}
        self.where = {}
        for name, file in _weight_files(self.path).items():
            if file not in files:
                files[file] = SafetensorsFile(file)
            if name not in files[file].tensors:
                raise ValueError(f"{self.path / INDEX_FILE}: tensor {name!r} is not in {file.name}")
            self.where[name] = files[file]

    def shape(self, name: str) -> tuple:
        return self.where[name].tensors[name][1]

    def dtype(self) -> torch.dtype:
        return next(iter(self.where.values())).tensors[next(iter(self.where))][0]


def check_shared_vocabulary(target: Path, others: list[Path], rows: int):
    """The first `rows` token ids of the target's tokenizer must be spelled as in each other model's."""
    mine = load_tokenizer(target)
    for other in others:
        theirs = load_tokenizer(other)
        for i in range(min(rows, mine.vocab_size, theirs.vocab_size)):
            if mine.id_to_piece(i) != theirs.id_to_piece(i):
                raise ValueError(f"{target}: token {i} is {mine.id_to_piece(i)!r} but {theirs.id_to_piece(i)!r} in "
                                 f"{other}; a chat vector needs the shared rows to be the same tokens")


def merge_models(method: str, out, models=(), weights=(), base=None, target=None, instruct=None,
                 tokenizer_from=None, dtype: str | None = None, max_shard_size="5GB",
                 block_bytes: int = BLOCK_BYTES) -> Path:
    """Write the merge (see the module docstring) to `out`; returns its path."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (expected {', '.join(METHODS)})")
    if method == "chat_vector":
        if not (target and instruct and base):
            raise ValueError("chat_vector needs --target, --instruct and --base")
        inputs = [Model(target), Model(instruct), Model(base)]
        w = list(weights) or [1.0]
        if len(w) != 1:
            raise ValueError(f"chat_vector takes one weight (the vector's scale), got {len(w)}")
    else:
        if not models:
            raise ValueError(f"{method} needs --models")
        w = list(weights) or [1.0] * len(models)
        if len(w) != len(models):
            raise ValueError(f"{len(models)} models but {len(w)} weights")
        inputs = [Model(m) for m in models]
        if method == "linear" and sum(w) == 0:
            raise ValueError("linear: the weights sum to 0")
        if method == "task_arithmetic":
            if not base:
                raise ValueError("task_arithmetic needs --base")
            inputs.append(Model(base))
    first = inputs[0]
    for model in inputs[1:]:
        missing = sorted(set(first.where) ^ set(model.where))
        if missing:
            where = first.path if missing[0] not in first.where else model.path
            raise ValueError(f"{where}: has no tensor {missing[0]!r}, which the other models have")
    shared_rows = {}
    for name in first.where:
        shapes = {m.shape(name) for m in inputs}
        rest = {m.shape(name) for m in inputs[1:]}
        if len(shapes) == 1:
            continue
        if method == "chat_vector" and name in VOCAB_ROWS and len(rest) == 1:
            small = next(iter(rest))
            if small[1:] == first.shape(name)[1:] and small[0] < first.shape(name)[0]:
                shared_rows[name] = small[0]
                continue
        raise ValueError(f"tensor {name!r} has different shapes: " + ", ".join(f"{m.path}: {list(m.shape(name))}" for m in inputs))
    if shared_rows:
        check_shared_vocabulary(first.path, [m.path for m in inputs[1:]], max(shared_rows.values()))
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else first.dtype()
    if out_dtype not in OUTPUT_DTYPES.values():
        raise ValueError(f"{first.path}: weights are {out_dtype}; name an output --dtype (float32, float16, bfloat16)")
    source = Path(tokenizer_from) if tokenizer_from else first.path
    _, hf_config = read_config(source)
    names = sorted(first.where)
    shards = _plan_shards([(n, int(torch.Size(first.shape(n)).numel()) * out_dtype.itemsize) for n in names],
                          parse_size(max_shard_size))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(tmp / file, "wb") as f:
                f.write(safetensors_header({n: torch.Size(first.shape(n)) for n in shard}, out_dtype))
                for name in sorted(shard):  # the data order of safetensors_header
                    write_merged(f, name, inputs, method, w, shared_rows.get(name), out_dtype, block_bytes)
                    weight_map[name] = file
                    total += int(torch.Size(first.shape(name)).numel()) * out_dtype.itemsize
        if len(shards) > 1:
            atomic_write(tmp / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_config["torch_dtype"] = {v: k for k, v in OUTPUT_DTYPES.items()}[out_dtype]
        hf_config["vocab_size"] = first.shape("model.embed_tokens.weight")[0]
        atomic_write(tmp / "config.json", json.dumps(hf_config, indent=2))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_merged(f, name: str, inputs: list[Model], method: str, weights: list[float], shared: int | None,
                 out_dtype: torch.dtype, block_bytes: int):
    """Stream the merge of tensor `name` into f, a block of rows at a time, computed in float64 as written:
    linear: sum_i w_i m_i / sum_i w_i over inputs; task_arithmetic (inputs: models..., base) and chat_vector
    (inputs: target, instruct, base): anchor + sum_i w_i (m_i - base), the anchor being base or target.
    shared (chat_vector, an extended vocabulary): rows from `shared` on are the target's."""
    shape = inputs[0].shape(name)
    rows = shape[0] if shape else 1
    step = max(1, block_bytes // (8 * int(torch.Size(shape[1:]).numel()))) if shape else 1
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        def read(model, a=start, b=stop):
            return model.where[name].read_rows(name, a, b)
        if method == "linear":
            block = sum(w * read(m) for m, w in zip(inputs, weights)) / sum(weights)
        elif method == "task_arithmetic":
            base = read(inputs[-1])
            block = base + sum(w * (read(m) - base) for m, w in zip(inputs[:-1], weights))
        else:
            block = read(inputs[0])
            top = stop if shared is None else min(stop, shared)
            if top > start:
                block[:top - start] += weights[0] * (read(inputs[1], start, top) - read(inputs[2], start, top))
        f.write(block.to(out_dtype).contiguous().view(torch.uint8).numpy().tobytes())


@dataclass(kw_only=True)
class MergeOptions:
    method: Literal["linear", "task_arithmetic", "chat_vector"]  # linear: weighted average; task_arithmetic: base + sum w_i (model_i - base); chat_vector: target + w (instruct - base)
    out: str  # output directory (Hugging Face layout)
    models: list[str] = field(default_factory=list)  # linear / task_arithmetic: the models to merge
    weights: list[float] = field(default_factory=list)  # one per model (default 1 each); chat_vector: the vector's scale w (default 1)
    base: str = ""  # task_arithmetic / chat_vector: the base model the differences are taken from
    target: str = ""  # chat_vector: the model the vector is added to (e.g. continually pretrained from base)
    instruct: str = ""  # chat_vector: the instruct model trained from base
    tokenizer_from: str = ""  # model whose config, tokenizer and chat template are written; '' = target, else the first model
    dtype: str = ""  # output dtype: float32, float16 or bfloat16; '' = the first input's
    max_shard_size: str = "5GB"  # largest safetensors shard

    def check(self):
        if self.dtype and self.dtype not in OUTPUT_DTYPES:
            raise OptionError(f"--dtype {self.dtype}: expected float32, float16 or bfloat16")


@cli
def main(argv=None):
    opts = parse_options(MergeOptions, argv, prog="python -m minillm.merge", description=__doc__.split("\n\n")[0])
    out = merge_models(opts.method, opts.out, opts.models, opts.weights, opts.base or None, opts.target or None,
                       opts.instruct or None, opts.tokenizer_from or None, opts.dtype or None, opts.max_shard_size)
    print(f"merged ({opts.method}) -> {out}")
    return out


if __name__ == "__main__":
    main()
