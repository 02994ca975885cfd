"""Command-line options of every minillm CLI: one dataclass per command, filled from its defaults, then a
JSON config file, then flags; `--help` is generated from the fields and their comments.

    @dataclass(kw_only=True)
    class Options:
        lr: float = 3e-4  # peak learning rate (> 0)
        schedule: Literal["linear", "cosine"] = "linear"  # how the rate decays after warmup

    cfg = parse_options(Options)                  # or {"sub": SubOptions, ...} for subcommands

Flags are `--name value` or `--name=value`, dashes or underscores alike; booleans take true/false/1/0 or
stand bare; list fields take every value up to the next flag (so a shell glob works); `Literal` fields
accept only their values; a field without a default is required. `--config FILE.json` sets any field
(flags override it), its values type-checked like flags. A dataclass may define `check(self)`, raising
`OptionError` for values out of range; `@cli` on a command's main turns every such error into one line
naming the option (and the file):
    error: --lr -1.0: must be > 0
The description of each option is the comment on (and right below) its field.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import sys
import tokenize
import types
import typing
from pathlib import Path

from minillm.files import read_json_object


class OptionError(ValueError):
    """A bad option value; str() is the whole error line's text."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def bad(name: str, value, allowed: str) -> OptionError:
    """OptionError '--name VALUE: allowed', for `check` methods."""
    return OptionError(f"{flag(name)} {value!r}: {allowed}")


def require(ok: bool, name: str, value, allowed: str):
    if not ok:
        raise bad(name, value, allowed)


# ----------------------------------------------------------------------------- types

def _optional(typ):
    """(inner type, True) for Optional[X] / X | None, else (typ, False)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return typ, False


def _is_list(typ) -> bool:
    return typ is list or typing.get_origin(typ) is list


def _type_name(typ) -> str:
    inner, optional = _optional(typ)
    if typing.get_origin(inner) is typing.Literal:
        name = "|".join(str(v) for v in typing.get_args(inner))
    elif _is_list(inner):
        name = _type_name((typing.get_args(inner) or (str,))[0]) + " ..."
    else:
        name = {str: "TEXT", int: "INT", float: "NUMBER", bool: "BOOL"}.get(inner, inner.__name__.upper())
    return name + ("|none" if optional else "")


def coerce(value, typ, where: str):
    """`value` (a flag's text, or a JSON value from a config file) as `typ`; OptionError naming `where`."""
    inner, optional = _optional(typ)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    if typing.get_origin(inner) is typing.Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if value == choice or (isinstance(value, str) and not isinstance(choice, str) and value == str(choice)):
                return choice
        raise OptionError(f"{where} {value!r}: choose one of {', '.join(map(str, choices))}")
    if _is_list(inner):
        item = (typing.get_args(inner) or (str,))[0]
        values = value if isinstance(value, list) else [value]
        return [coerce(v, item, where) for v in values]
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise OptionError(f"{where} {value!r}: expected {_type_name(typ).lower()}") from None
    raise TypeError(f"options: unsupported field type {typ!r}")


# ----------------------------------------------------------------------------- help text

def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} for a dataclass and its bases: the `# ...` on the field's line and on
    the comment lines right below it (subclasses win, so a re-declared default may re-describe a field)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        rows: dict[int, list] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                rows.setdefault(tok.start[0], []).append(tok)
        current = None
        for _, toks in sorted(rows.items()):
            first = toks[0]
            if first.type == tokenize.NAME and first.string in names and len(toks) > 1 and toks[1].string == ":":
                current = first.string
                if toks[-1].type == tokenize.COMMENT:
                    comments[current] = toks[-1].string.lstrip("#").strip()
            elif current and len(toks) == 1 and first.type == tokenize.COMMENT and first.start[1] > 4 \
                    and current in comments:  # an indented comment line continues the field's comment
                comments[current] += " " + first.string.lstrip("#").strip()
            else:
                current = None
    return comments


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def help_text(cls, prog: str, description: str = "") -> str:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    lines = [f"usage: {prog} [--config FILE.json] [--option value ...]"]
    if description:
        lines += ["", description.strip()]
    lines += ["", "options:"]
    # The command's own options first, then those it shares with others (a base class's fields).
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    order = [n for klass in cls.__mro__ for n in getattr(klass, "__annotations__", {}) if n in by_name]
    for f in (by_name[n] for n in dict.fromkeys(order)):
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {json.dumps(default)}"
        lines.append(f"  {flag(f.name)} {_type_name(hints[f.name])}")
        lines.append(f"      {comments.get(f.name, '')} ({shown})".replace("       (", "      ("))
    lines.append("  --config FILE.json")
    lines.append("      any of the options above as a JSON object; flags given too override it (default: none)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing

def _split_argv(argv: list[str]) -> list[tuple[str, list[str]]]:
    pairs: list[tuple[str, list[str]]] = []  # (name, the values that follow it)
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            pairs.append((key.replace("-", "_"), [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(arg)
        else:
            raise OptionError(f"unexpected argument {arg!r} (options look like --name value; see --help)")
    return pairs


def build_options(cls, argv: list[str]):
    """The dataclass instance for argv (no --help handling): defaults < --config file < flags."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    pairs = _split_argv(argv)
    values: dict = {}
    for key, vals in pairs:  # the config file first, so that flags override it
        if key != "config":
            continue
        if len(vals) != 1:
            raise OptionError("--config takes one file")
        path = vals[0]
        try:
            file_values = read_json_object(path, "config file")
        except ValueError as e:
            raise OptionError(str(e)) from None
        for k, v in file_values.items():
            name = k.replace("-", "_")
            if name not in names:
                raise OptionError(f"{path}: unknown option {k!r}")
            values[name] = coerce(v, hints[name], f"{path}: option {k!r}:")
    for key, vals in pairs:
        if key == "config":
            continue
        if key not in names:
            raise OptionError(f"unknown option {flag(key)}; see --help")
        typ = hints[key]
        if _is_list(_optional(typ)[0]):
            values[key] = coerce(vals, typ, flag(key))
        elif _optional(typ)[0] is bool and not vals:
            values[key] = True
        elif len(vals) != 1:
            raise OptionError(f"option {flag(key)} takes one value, got {len(vals)}"
                              + (f": {' '.join(vals)}" if vals else ""))
        else:
            values[key] = coerce(vals[0], typ, flag(key))
    missing = [f.name for f in dataclasses.fields(cls) if _default(f) is dataclasses.MISSING and f.name not in values]
    if missing:
        raise OptionError(f"{flag(missing[0])} is required; see --help")
    cfg = cls(**values)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def parse_options(spec, argv=None, prog: str | None = None, description: str = ""):
    """Options for a command: `spec` is an options dataclass (returns its instance) or a dict of
    subcommand name -> dataclass (returns (name, instance); arguments that start with an option mean the
    first subcommand). `-h`/`--help` prints the help and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    if isinstance(spec, dict):
        first = next(iter(spec))
        if not argv or argv[0] in ("-h", "--help"):
            print(f"usage: {prog} [COMMAND] [--option value ...]   (without a COMMAND: {first}; {prog} COMMAND "
                  "--help for its options)")
            if description:
                print("\n" + description.strip())
            print("\ncommands:")
            for name, cls in spec.items():
                print(f"  {name:<12} {(inspect.getdoc(cls) or '').splitlines()[0]}")
            sys.exit(0 if argv else 2)
        command = argv[0]
        if command.startswith("--") and command not in ("--help",):  # options first: the first command
            command, argv = first, [first, *argv]
        if command not in spec:
            raise OptionError(f"unknown command {command!r} (choose one of {', '.join(spec)})")
        cls = spec[command]
        if "-h" in argv or "--help" in argv:
            print(help_text(cls, f"{prog} {command}", inspect.getdoc(cls) or ""))
            sys.exit(0)
        positional = getattr(cls, "POSITIONAL", None)  # `info DIR` for `info --dir DIR`
        if positional and len(argv) > 1 and not argv[1].startswith("--"):
            argv = [command, f"--{positional.replace('_', '-')}", argv[1], *argv[2:]]
        return command, build_options(cls, argv[1:])
    if "-h" in argv or "--help" in argv:
        print(help_text(spec, prog, description))
        sys.exit(0)
    return build_options(spec, argv)


def cli(main):
    """Decorator for a command's main(argv=None): bad input (ValueError, OSError) becomes one line,
    `error: ...`, on stderr and exit status 1, never a traceback; Ctrl-C one line, `interrupted`, status 130.
    MINILLM_TRACEBACK=1 shows the traceback instead."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except (ValueError, OSError) as e:
            if os.environ.get("MINILLM_TRACEBACK"):
                raise
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
                message = f"{e.filename}: {message}"
            dist = sys.modules.get("torch.distributed")
            if dist is not None and dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()  # no barrier: the other ranks may have stopped already
            print(f"error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it (a training run saves first)
            if os.environ.get("MINILLM_TRACEBACK"):
                raise
            print("interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    return run


# ----------------------------------------------------------------------------- the training scripts' options

TENSORBOARD_HINT = "--log-to tensorboard needs the tensorboard package: pip install 'minillm[tensorboard]'"
REFERENCE_LOGPS = "reference_logps.safetensors"  # DPO/IPO/KTO: log pi_ref of every example (minillm.preference)
RUN_FILES = ("options.json", "metrics.jsonl", "checkpoints", "model", "tensorboard", REFERENCE_LOGPS)  # what marks an out_dir as holding a run

@dataclasses.dataclass(kw_only=True)
class TrainOptions:
    """What the three training scripts share: model, optimisation, run directory."""
    # model
    init_from: str = ""  # Hugging Face model directory to continue
    tokenizer: str = ""  # tokenizer directory; '' = init_from's own
    seq_len: int = 512  # tokens per row
    attn: typing.Literal["auto", "triton", "sdpa", "math"] = "auto"  # attention backend; auto = triton on CUDA if installed, else sdpa
    activation_checkpointing: typing.Literal["none", "selective", "full"] = "none"  # recompute in backward to save memory: selective reruns only elementwise work, full whole blocks
    compile: bool = False  # torch.compile each transformer block (the first steps compile, then faster; not with ZeRO-2)
    # optimisation
    micro_batch_size: int = 8  # rows per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro_batch_size x grad_accum x ranks
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    lr_schedule: typing.Literal["linear", "cosine", "wsd", "constant"] = "linear"  # decay after warmup; wsd = warmup-stable-decay (PLLuM's annealing)
    warmup_steps: int = 10  # steps of linear warmup from 0 to lr
    decay_fraction: float = 0.2  # wsd only: share of the steps spent decaying, at the end
    weight_decay: float = 0.0  # AdamW weight decay of the matrices (never of norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    zero_stage: typing.Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage (3 shards weights, gradients and optimizer state)
    offload: typing.Literal["none", "optimizer", "optimizer+params"] = "none"  # ZeRO-Offload, for fewer GPUs than the model states need: AdamW's state and the fp32 weights in CPU memory (ZeRO 1-3), +params also ZeRO-3's weight partitions
    deepspeed: str = ""  # a DeepSpeed JSON merged over the generated config
    # run directory, logging, checkpoints
    out_dir: str = "runs/demo/run"  # where metrics, checkpoints and the exported model go
    log_interval: int = 10  # print the step line every N steps (and at every validation and the last step)
    log_to: typing.Literal["", "tensorboard"] = ""  # also write every metric to TensorBoard event files in OUT_DIR/tensorboard (needs the tensorboard package)
    eval_interval: int = 50  # validate every N steps and after the last one; 0 = only at epoch ends and after the last step
    save_interval: int = 200  # checkpoint every N steps and after the last one; 0 = only after the last step (and on SIGTERM)
    keep_checkpoints: int = 2  # checkpoints kept in OUT_DIR/checkpoints (the oldest are deleted)
    universal_checkpoints: bool = False  # also write each checkpoint in DeepSpeed's universal format at save (a resume on another number of ranks converts it otherwise; costs the optimizer's size again on disk)
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False  # start afresh in an out_dir that holds a run (its checkpoints, metrics and model are deleted)
    seed: int = 1337  # seed of initialisation, data order and sampling
    peak_tflops: float = 0.0  # device peak for MFU; 0 = the published figure of known GPUs, measured on CPU

    def check(self):
        positive = ("seq_len", "micro_batch_size", "grad_accum", "log_interval", "keep_checkpoints")
        for name in positive:
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            require(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a positive number")
        require(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be between 0 and --lr ({self.lr})")
        require(0 <= self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "must be between 0 and 1")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        require(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")
        require(self.offload == "none" or self.zero_stage >= 1, "offload", self.offload,
                "needs --zero-stage 1, 2 or 3 (ZeRO-0 keeps every state on the GPU)")
        require(self.offload != "optimizer+params" or self.zero_stage == 3, "offload", self.offload,
                "needs --zero-stage 3 (only ZeRO-3 partitions the weights); use --offload optimizer")
        if self.log_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise OptionError(TENSORBOARD_HINT)
        if self.resume and self.overwrite:
            raise OptionError("--resume and --overwrite exclude each other: continue the run, or start it afresh")
        # A re-run must never silently replace a finished model or mix two runs' metrics.
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise OptionError(f"--out-dir {out}: exists and is not a directory")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not (self.resume or self.overwrite):
            raise OptionError(f"--out-dir {out}: holds a run already ({', '.join(found)}); add --resume to continue "
                              "it or --overwrite to start afresh")
