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
import inspect
import io
import json
import os
import sys
import tokenize
import types
import typing

from minillm.files import read_json_object


class OptionError(ValueError):
    """A bad option value; str() is the whole error line's text."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def bad(name: str, value, allowed: str) -> OptionError:
    """OptionError '--name VALUE: allowed', for `check` methods."""
    return OptionError(f"{flag(name)} {value!r}: {allowed}")


def require_option(ok: bool, name: str, value, allowed: str):
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
