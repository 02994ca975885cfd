"""Hugging Face checkpoint interop: read and write the `transformers` Llama / Mistral / Qwen2 directory layout.

The three model types are one architecture (minillm/model.py): Mistral's config.json may set head_dim
(Nemo: 128 with hidden 5120 and 32 heads), Qwen2 has q/k/v biases. A directory is saved back as the
model_type and architectures it was loaded from, with the fields that type's own config.json has, so
transformers, vLLM and lm-eval load the result as that family. Sliding-window attention (Mistral-7B-v0.1,
Qwen2 with use_sliding_window) is not implemented and refused with the field named.

A Hugging Face directory holds `config.json`, the weights as `model.safetensors` (or shards
`model-00001-of-0000N.safetensors` listed in `model.safetensors.index.json`) and
`generation_config.json`. This module maps both the config and the parameter names between that
layout and minillm's (llama2.c-style names, see minillm/model.py).

No q/k permutation happens here. Meta's original checkpoints rotate *interleaved* pairs of head
dims (x0,x1), (x2,x3), ...; when Hugging Face converted them it permuted the rows of wq/wk once so
that its "rotate half" code (pairs (x_i, x_{i+d/2})) computes the same attention. minillm's
rotary uses that same rotate-half layout, so HF q_proj/k_proj weights are copied as they are, in
both directions. (Loading Meta's original `consolidated.*.pth` files would need the permutation;
those are pickles, which minillm never reads.)

Loading is streamed: the model is built on the meta device (no memory, no random init), then
storage for it is allocated once and every tensor is copied from the memory-mapped safetensors
files one at a time, so peak RAM is about one model plus one tensor. Under ZeRO-3 the model is built
partitioned instead and each tensor passes through a gathering (load_weights): its partition plus one tensor.

Public API: load_pretrained(path, dtype=None, device='cpu') and save_pretrained(model, path, ...); read_config and
load_weights for a model built elsewhere (ZeRO-3's partitioned start, minillm/engine.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minillm.files import to_json
from minillm.model import Llama, LlamaConfig, no_gathering, rope_inv_freq

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# ----------------------------------------------------------------------------- parameter names

# minillm name -> Hugging Face name. Per-layer entries are relative to `layers.{i}.` /
# `model.layers.{i}.`. HF's gate_proj/up_proj/down_proj are llama2.c's w1/w3/w2.
GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",  # attention_bias (Qwen2) only
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Tensors some HF checkpoints carry that are not weights (old conversions stored the rotary table).
IGNORED_HF_NAMES = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def to_hf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for minillm parameter {name!r}")


# ----------------------------------------------------------------------------- config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# model_type -> the class name config.json's "architectures" gives (what vLLM and lm-eval dispatch on).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _first(x):
    """HF allows a list of token ids where one is usual (eos: Llama-3 Instruct); the first of them."""
    return (x[0] if x else None) if isinstance(x, list) else x


# The config.json fields minillm reads, and what each must be (None: the field may be null).
_POSITIVE_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _check_types(hf: dict, source: str):
    """One line naming the field, its value and what it must be, for any field of the wrong type or sign."""
    def bad(key, expected):
        raise ValueError(f"{source}: {key}={hf[key]!r} must be {expected}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        if key in hf and not (is_int(hf[key]) and hf[key] > 0) and not (key in _OPTIONAL_POSITIVE_INTS and hf[key] is None):
            bad(key, "a positive integer" + (" or null" if key in _OPTIONAL_POSITIVE_INTS else ""))
    for key in _POSITIVE_NUMBERS:
        if key in hf and not (isinstance(hf[key], (int, float)) and not isinstance(hf[key], bool) and hf[key] > 0):
            bad(key, "a positive number")
    for key in _TOKEN_IDS:
        value = hf.get(key)
        if value is not None and not (is_int(value) and value >= 0) and not (
                isinstance(value, list) and all(is_int(v) and v >= 0 for v in value)):
            bad(key, "a token id (an integer >= 0), a list of them, or null")
    if "tie_word_embeddings" in hf and not isinstance(hf["tie_word_embeddings"], bool):
        bad("tie_word_embeddings", "true or false")


def config_from_hf(hf: dict, source: str = "config.json") -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict (model_type llama, mistral or qwen2); anything minillm
    does not implement (sliding-window attention, other activations, MLP or o-projection biases, rope
    scalings other than Llama-3's) is an error naming the field, and so is a value of the wrong type."""
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: must be a JSON object (found a {type(hf).__name__})")
    _check_types(hf, source)
    family = hf.get("model_type", "llama")
    if family not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type {family!r} is not supported (minillm loads "
                         f"{', '.join(ARCHITECTURES)})")
    refused = [("hidden_act", "silu"), ("mlp_bias", False)]
    if family == "llama":  # HF Llama's attention_bias also biases o_proj; Qwen2's biases are q/k/v only
        refused.append(("attention_bias", False))
    if family == "qwen2":  # Qwen2 configs carry sliding_window and max_window_layers even when unused
        refused.append(("use_sliding_window", False))
    for key, ok in refused:
        if hf.get(key, ok) != ok:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (minillm needs {ok!r})")
    window = hf.get("sliding_window") if family == "mistral" else None
    if window is not None and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"{source}: sliding_window={window} is not supported (minillm attends over the whole "
                         f"context); set it to null to load the model as full attention, exact up to {window} tokens")
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise ValueError(f"{source}: layer_types {hf['layer_types']} is not supported (only full_attention)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in hf:
            raise ValueError(f"{source}: missing field {key!r}")
    n_heads = hf["num_attention_heads"]
    # transformers >= 5 nests rope_theta and the scaling dict in "rope_parameters"; older configs
    # (and every Hub Llama) have top-level "rope_theta" and "rope_scaling".
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise ValueError(f"{source}: rope_scaling {scaling!r} is not supported (only 'llama3')")
    eos = hf.get("eos_token_id", 2)
    try:
        return LlamaConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim"),  # absent or null: hidden_size // num_attention_heads
            hidden_dim=hf["intermediate_size"],
            attention_bias=family == "qwen2",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
            family=family,
            bos_id=_first(hf.get("bos_token_id", 1)),
            eos_id=_first(eos),
            eos_ids=list(eos) if isinstance(eos, list) and eos else None,  # written back as a list
            pad_id=_first(hf.get("pad_token_id")),
        )
    except ValueError as e:  # shapes that do not divide evenly
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: LlamaConfig, dtype: torch.dtype) -> dict:
    """config.json content, in the classic layout (top-level rope_theta / rope_scaling) that every
    transformers version, vLLM and llama.cpp's converter read, with the fields config.family's own
    config.json has (transformers' own values for the sliding window that minillm never uses)."""
    hf = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_ids or config.eos_id,
        "pad_token_id": config.pad_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif config.family == "mistral":
        hf.update(sliding_window=None)
    else:  # qwen2: the biases are implied; head_dim only when it is not hidden_size / heads (as Qwen's own)
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
        if config.head_dim == config.dim // config.n_heads:
            del hf["head_dim"]
    return hf


def generation_config(config: LlamaConfig) -> dict:
    gen = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_ids or config.eos_id}
    if config.pad_id is not None:
        gen["pad_token_id"] = config.pad_id
    return gen


def _resolve_dtype(dtype, hf: dict | None = None):
    """None -> float32 (safe to train); 'auto' -> the dtype config.json records; names or torch dtypes."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = (hf or {}).get("torch_dtype") or (hf or {}).get("dtype") or "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype {dtype} not supported; use float32, float16 or bfloat16")
    return dtype


# ----------------------------------------------------------------------------- loading

def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file, or via the shard index)."""
    if (path / SINGLE_FILE).is_file():  # transformers also prefers the single file
        return {name: path / SINGLE_FILE for name in _keys(path / SINGLE_FILE)}
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from None
        for name, shard in weight_map.items():  # shards are file names beside the index, never paths elsewhere
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"{path / INDEX_FILE}: tensor {name!r} is in {shard!r}, not a file name in {path}")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {INDEX_FILE} is missing")
        return files
    if any(path.glob("pytorch_model*.bin")) or any(path.glob("*.pth")):
        raise ValueError(f"{path}: only pickle checkpoints (.bin/.pth) found; minillm never unpickles. "
                         "Convert to safetensors first, e.g. transformers' "
                         "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:  # truncated or corrupted header/data region
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupted?): {e}") from None


def _keys(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


def read_config(path) -> tuple[LlamaConfig, dict]:
    """The LlamaConfig of a Hugging Face directory, and its config.json as read (no weights are touched)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found (is {path} a Hugging Face model directory?)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}:{e.lineno}: invalid JSON ({e.msg})") from None
    return config_from_hf(hf, str(config_file)), hf


def load_pretrained(path, dtype=None, device="cpu") -> Llama:
    """Load a Hugging Face Llama, Mistral or Qwen2 directory into a minillm Llama.

    dtype: None -> float32 (what training wants), 'auto' -> config.json's torch_dtype, or
    torch.float32 / torch.bfloat16 / torch.float16 (or their names). Tensors are converted as
    they are copied, so a bf16 checkpoint loads as fp32 without an intermediate bf16 model.
    """
    config, hf = read_config(path)
    dtype = _resolve_dtype(dtype, hf)
    files = _weight_files(Path(path))  # before any allocation: a directory without weights fails at once
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = Llama(config)
    model.to(dtype)
    model.to_empty(device=device)  # uninitialised storage, filled below
    # to_empty makes a fresh tensor per module, which unties the shared embedding/head parameter.
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # The rotary frequencies are not in the checkpoint; recompute them (and keep them fp32).
    model.inv_freq = rope_inv_freq(config).to(device)
    load_weights(model, path, files=files)
    return model


def full_shape(param) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its data is then empty; ds_shape is the whole)."""
    return getattr(param, "ds_shape", param.shape)


def load_weights(model: Llama, path, gathered=None, reads: bool = True, files=None):
    """Copy the tensors of the Hugging Face directory `path` into `model`'s parameters, one tensor at a time
    from the memory-mapped safetensors files (converted to each parameter's dtype and device as copied).

    ZeRO-3 (minillm.engine): the parameters are partitioned; `gathered([p])` is a context in which p is whole
    and what the reading rank writes into it becomes every rank's partition on exit, and `reads` is True on
    that one rank only. Every rank checks the names and shapes (from the files' headers), so a bad directory
    fails on all of them alike. Peak memory: the rank's partition plus one whole tensor."""
    files = files or _weight_files(Path(path))
    gathered = gathered or no_gathering
    config = model.config
    wanted = {}  # HF name -> (minillm name, parameter)
    for name, param in model.named_parameters():  # named_parameters lists a tied parameter once
        wanted[to_hf_name(name)] = (name, param)
    unexpected = [n for n in files if n not in wanted and not IGNORED_HF_NAMES.fullmatch(n)
                  and not (config.tie_embeddings and n == GLOBAL_NAMES["output.weight"])]
    if unexpected:
        raise ValueError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected in all; is this a plain {config.family} checkpoint?)")
    missing = [n for n in wanted if n not in files]
    if missing:
        where = Path(path) / (INDEX_FILE if (Path(path) / INDEX_FILE).is_file()
                              and not (Path(path) / SINGLE_FILE).is_file() else SINGLE_FILE)
        hint = " (set tie_word_embeddings in config.json if the head shares the embedding)" \
            if missing[0] == GLOBAL_NAMES["output.weight"] else ""
        raise ValueError(f"{where}: missing tensor {missing[0]!r}{hint}")

    with torch.no_grad():
        for hf_name, (_, param) in wanted.items():
            file = files[hf_name]
            # One opening per tensor: the file's pages this read touched leave the process's resident set when
            # the mapping closes, instead of piling up to the whole shard.
            with _open(file) as f:
                try:
                    shape = f.get_slice(hf_name).get_shape()
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{file}: cannot read tensor {hf_name!r}: {e}") from None
                if list(shape) != list(full_shape(param)):
                    raise ValueError(f"{file}: tensor {hf_name!r} has shape {list(shape)}, "
                                     f"config.json implies {list(full_shape(param))}")
                with gathered([param]):
                    if reads:
                        try:
                            tensor = f.get_tensor(hf_name)
                        except (SafetensorError, OSError) as e:
                            raise ValueError(f"{file}: cannot read tensor {hf_name!r}: {e}") from None
                        param.copy_(tensor)  # converts dtype and moves to device
                        del tensor


def parse_size(size) -> int:
    """'5GB' -> 5 * 10**9 bytes (decimal units, as transformers), '2GiB' -> 2 * 2**30, ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB' or '500MB'")
    unit = m.group(2)
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _plan_shards(names_sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, in order: start a new shard when the next tensor would overflow the current one."""
    shards, current, used = [], [], 0
    for name, nbytes in names_sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


# safetensors' names of torch dtypes, and the header exactly as safetensors.torch.save_file writes it (tested
# byte for byte): the length as 8 little-endian bytes, then compact JSON, "__metadata__" first and the tensors in
# the order of their data (for tensors of one dtype: by name), padded with spaces to a multiple of 8 bytes.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def safetensors_header(shapes: dict[str, torch.Size], dtype: torch.dtype) -> bytes:
    """The header of a safetensors file holding tensors of these shapes, all of `dtype`, data in name order:
    what lets a file be written one tensor at a time, never holding more than that tensor."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        nbytes = shapes[name].numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _is_weight_file(name: str) -> bool:
    return name == INDEX_FILE or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", name) is not None


def save_pretrained(model: Llama, path, dtype=None, max_shard_size="5GB", tokenizer=None,
                    chat_template: str | None = None, extra_files: dict[str, str] | None = None,
                    gathered=None, writes: bool = True):
    """Write `model` in the Hugging Face layout that transformers.AutoModelForCausalLM loads.

    dtype: None keeps the model's dtype. Weights go into `model.safetensors`, or shards plus
    `model.safetensors.index.json` when larger than max_shard_size. A tied head is not written
    (HF re-ties it from tie_word_embeddings). Everything is first written to a temporary
    directory beside `path`: a new directory appears in one rename; into an existing directory
    each file is moved with os.replace (other files there, e.g. a tokenizer, are kept; weight
    files left by an earlier save with a different sharding are deleted afterwards). The tokenizer (with
    `chat_template`) and `extra_files` ({name: text}) are written alongside.

    The weights are streamed into each file one tensor at a time (the header is written first, from the
    shapes), so saving holds at most one converted tensor beside the model. ZeRO-3
    (minillm.checkpoints.export_model): every rank calls this; `gathered([p])` makes one partitioned
    parameter whole for the time it is written, and only the rank with `writes` writes the files. A writer
    that fails (a full disk) keeps taking part in the gathering to the end, so no rank waits forever, and
    then raises.
    """
    path = Path(path)
    params = dict(model.named_parameters())  # a tied head appears once, as tok_embeddings.weight
    dtype = _resolve_dtype(dtype) if dtype is not None else next(iter(params.values())).dtype
    config = model.config
    hf_names = {to_hf_name(n): p for n, p in params.items()}
    shards = _plan_shards([(n, full_shape(p).numel() * dtype.itemsize) for n, p in hf_names.items()],
                          parse_size(max_shard_size))
    gathered = gathered or no_gathering

    def write_shard(file: Path | None, names: list[str]):
        """Stream one shard's tensors into `file`, one gathered tensor at a time (file None: only take part in
        the gathering). A failed write still takes part in the remaining gatherings, then raises."""
        out, error = None, None
        try:
            if file is not None:
                out = open(file, "wb")
                out.write(safetensors_header({n: full_shape(hf_names[n]) for n in names}, dtype))
        except OSError as e:
            error = e
        for n in sorted(names):  # the order of the data in the file (safetensors_header)
            with gathered([hf_names[n]]):
                if out is not None and error is None:
                    try:
                        out.write(hf_names[n].detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy())
                    except OSError as e:
                        error = e
        try:
            if out is not None:
                out.close()
        except OSError as e:
            error = error or e
        if error is not None:
            raise error

    if not writes:
        for names in shards:
            write_shard(None, names)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    error = None
    try:
        weight_map, total = {}, 0
        for i, names in enumerate(shards):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            try:  # after a failed write, go on gathering with the other ranks, then raise
                write_shard(tmp / file if error is None else None, names)
            except OSError as e:
                error = e
            for n in names:
                weight_map[n] = file
                total += full_shape(hf_names[n]).numel() * dtype.itemsize
        if error is not None:
            raise error
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config_to_hf(config, dtype))
        _write_json(tmp / "generation_config.json", generation_config(config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp, chat_template=chat_template)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _move_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_json(file: Path, obj):
    file.write_text(to_json(obj), encoding="utf-8")


def _move_into(tmp: Path, path: Path):
    # mkdtemp makes a private (0700) directory and safetensors writes 0600 files; give them the
    # usual umask-based modes so the checkpoint is as readable as any other file the user writes.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for file in tmp.iterdir():
        file.chmod(0o666 & ~umask)
    if not path.exists():
        os.replace(tmp, path)  # the whole directory appears at once
        return
    new = sorted(p.name for p in tmp.iterdir())
    # Weights first, index and config last: a reader never sees an index naming absent shards.
    order = sorted(new, key=lambda n: (n in (INDEX_FILE, "config.json"), n))
    for name in order:
        os.replace(tmp / name, path / name)
    for stale in path.iterdir():
        if _is_weight_file(stale.name) and stale.name not in new:
            stale.unlink()

