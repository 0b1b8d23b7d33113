"""Configs in and out: typed values from TOML and the command line, dotted overrides,
the TOML writer, and the trainer's argv.

    cfg = load_config("configs/tiny-gpt.toml", ["--train.steps=50", "--model.attention=sdpa"])
    save_config(cfg, cfg.run.dir)             # writes <run.dir>/config.toml
    assert load_config(Path(cfg.run.dir) / "config.toml") == cfg

Values are coerced to the schema's field types (:mod:`.schema`) and the built config
is validated there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from .schema import (CONFIG_FILE, REMOVED_FIELDS, SECTIONS, Config, ConfigError, _consistency_errors,
                     _did_you_mean, _range_errors, format_errors)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# --------------------------------------------------------------------------- types
def _hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """(inner type, is_optional) for ``X | None``."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, opt = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is list:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    elif origin is dict:
        name = "table"
    else:
        name = inner.__name__
    return f"{name} or none" if opt else name


def _coerce(value: Any, tp, where: str) -> Any:
    """Check a TOML value against field type ``tp``; ints are accepted for floats."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: none is not allowed; give a {_type_name(tp)}")
    origin = typing.get_origin(inner)
    if origin is list:
        (elem,) = typing.get_args(inner)
        if not isinstance(value, list):
            if elem is str and isinstance(value, str):
                return [value]  # a single string where a list of strings is expected
            raise ConfigError(f"{where}: expected a {_type_name(tp)}, got {value!r}; e.g. [0.9, 0.95]")
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table (e.g. [{where}] in TOML), got {value!r}")
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is bool and not isinstance(value, bool) or \
            inner is not bool and (not isinstance(value, inner) or isinstance(value, bool)):
        hint = ' (quote strings in TOML: key = "value")' if inner is str else \
            f" (write it without quotes: {value})" if isinstance(value, str) and inner in (int, float) else ""
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}")
    return value


def _parse_cli_value(text: str, tp, where: str) -> Any:
    """Parse the text of ``--section.field=text`` to the field's type."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(inner)
    if origin is dict:
        return _parse_toml_value(text, where, table=True)
    if origin is list:
        (elem,) = typing.get_args(inner)
        s = text.strip()
        if s.startswith("["):
            return _coerce(_parse_toml_value(s, where), inner, where)
        items = [t.strip() for t in s.split(",")] if s else []
        return [_parse_cli_value(t, elem, f"{where}[{i}]") for i, t in enumerate(items)]
    if inner is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if inner is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    return text


def _parse_toml_value(text: str, where: str, table: bool = False) -> Any:
    """A TOML literal (number, bool, string, array, inline table); a bare word stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if table:
            raise ConfigError(f"{where}: expected a TOML inline table like {{key = 1}}, got {text!r}") \
                from None
        return text


# --------------------------------------------------------------------------- building
def from_dict(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from nested ``{section: {field: value}}``."""
    errors: list[str] = []
    sections = {}
    for key in data:
        if key not in SECTIONS:
            errors.append(f"unknown section [{key}].{_did_you_mean(key, SECTIONS)} "
                          f"Sections: {', '.join(SECTIONS)}.")
    for sec_name, sec_cls in SECTIONS.items():
        values = data.get(sec_name, {})
        if not isinstance(values, dict):
            errors.append(f"{sec_name}: expected a table [{sec_name}], got {values!r}")
            values = {}
        hints = _hints(sec_cls)
        kwargs = {}
        for key, value in values.items():
            where = f"{sec_name}.{key}"
            if where in REMOVED_FIELDS:
                errors.append(f"{where} was removed: {REMOVED_FIELDS[where]}; delete it from the config")
                continue
            if key not in hints:
                errors.append(f"unknown field {where}.{_did_you_mean(key, hints)} "
                              f"Fields of [{sec_name}]: {', '.join(hints)}.")
                continue
            try:
                kwargs[key] = _coerce(value, hints[key], where)
            except ConfigError as e:
                errors.append(str(e))
        sections[sec_name] = sec_cls(**kwargs)
    cfg = Config(**sections)
    # The keys given explicitly: model.init_from fills the others from the weights and refuses
    # given ones that contradict them (fmtrain/init_from.py, when the run starts).
    cfg._given = {s: set(v) for s, v in data.items() if isinstance(v, dict)}
    if not errors:
        errors = _range_errors(cfg)
    if not errors and not cfg.model.init_from:  # with init_from: once [model] is filled (check_config)
        errors = _consistency_errors(cfg)
    if errors:
        raise ConfigError(format_errors(errors))
    return cfg


# --------------------------------------------------------------------------- overrides
_OVERRIDE = re.compile(r"^--([A-Za-z_][\w]*)\.([A-Za-z_][\w.\-]*)(?:=(.*))?$", re.S)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--section.field=value`` (or ``--section.field value``) to nested ``data``.

    Values are parsed to the field's type; a table field (``parallel.deepspeed``)
    takes deeper keys, ``--parallel.deepspeed.zero_optimization.overlap_comm=true``,
    whose values are read as TOML literals. Returns a new dict.
    """
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    args = list(overrides)
    i = 0
    while i < len(args):
        arg = args[i]
        mo = _OVERRIDE.match(arg)
        if not mo:
            raise ConfigError(f"cannot read the argument {arg!r}: overrides look like "
                              "--section.field=value, e.g. --train.steps=100")
        sec, path, text = mo.group(1), mo.group(2), mo.group(3)
        if text is None:  # "--section.field value"
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{arg} has no value: write {arg}=VALUE")
            text = args[i + 1]
            i += 1
        i += 1
        if sec not in SECTIONS:
            raise ConfigError(f"unknown section in {arg}.{_did_you_mean(sec, SECTIONS)} "
                              f"Sections: {', '.join(SECTIONS)}.")
        hints = _hints(SECTIONS[sec])
        name, _, rest = path.partition(".")
        if f"{sec}.{name}" in REMOVED_FIELDS:
            raise ConfigError(f"{sec}.{name} was removed: {REMOVED_FIELDS[f'{sec}.{name}']}; drop {arg}")
        if name not in hints:
            raise ConfigError(f"unknown field {sec}.{name} in {arg}.{_did_you_mean(name, hints)} "
                              f"Fields of [{sec}]: {', '.join(hints)}.")
        where = f"{sec}.{name}"
        section = data.setdefault(sec, {})
        if rest:
            if typing.get_origin(hints[name]) is not dict:
                raise ConfigError(f"{arg}: {where} is a {_type_name(hints[name])}, not a table; "
                                  f"write --{where}=VALUE")
            table = section.setdefault(name, {})
            table = section[name] = json.loads(json.dumps(table))  # deep copy, don't alias the file's
            *parents, leaf = rest.split(".")
            for key in parents:
                table = table.setdefault(key, {})
            table[leaf] = _parse_toml_value(text, f"{where}.{rest}")
        else:
            section[name] = _parse_cli_value(text, hints[name], where)
    return data


# --------------------------------------------------------------------------- files
# The source checkout fmtrain runs from: its configs/ and tokenizer/ are found from any directory.
PROJECT = Path(__file__).resolve().parents[2]


def input_candidates(value: str, config_file: str | os.PathLike | None = None) -> list[Path]:
    """Where a relative input path of a config is looked for, in order: the working directory,
    the config file's folder, the fmtrain project (so that shipped configs work from anywhere)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    folders = [Path.cwd()] + ([Path(config_file).resolve().parent] if config_file else []) + [PROJECT]
    return list(dict.fromkeys(folder / path for folder in folders))


def input_exists(path: Path) -> bool:
    """``path`` exists, or names a SentencePiece model without its ``.model``."""
    return path.exists() or path.with_name(path.name + ".model").is_file()


def _find_input(value: str, config_file: str | os.PathLike | None) -> str:
    """``value`` as given when it exists from the working directory (or is not found anywhere:
    the error that follows names every place tried), else the absolute path where it was found."""
    if not value or input_exists(Path(value).expanduser()):
        return value
    found = [p for p in input_candidates(value, config_file) if input_exists(p)]
    return str(found[0]) if found else value


def _config_file(path: Path) -> Path:
    if path.is_file():
        return path
    shipped = PROJECT / path
    if not path.is_absolute() and shipped.is_file() and (PROJECT / "configs").is_dir():
        from ..errors import is_rank_zero

        if is_rank_zero():  # once per job, not once per rank
            print(f"config: {path} is not in {Path.cwd()}; using fmtrain's own {shipped}", file=sys.stderr)
        return shipped
    folder = Path("configs") if Path("configs").is_dir() else PROJECT / "configs"
    hint = f" Configs in {folder}: {', '.join(sorted(p.name for p in folder.glob('*.toml')))}." \
        if folder.is_dir() else ""
    raise ConfigError(f"config file {str(path)!r} does not exist.{hint}")


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read a TOML config, apply ``--section.field=value`` overrides, validate. Relative input
    paths (``data.tokenizer``, ``model.init_from``) are found as :func:`input_candidates` says."""
    path = _config_file(Path(path))
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        cfg = from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    given = cfg._given  # not a field: a replaced config would lose which fields the file gave
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer=_find_input(cfg.data.tokenizer, path)),
        model=dataclasses.replace(cfg.model, init_from=_find_input(cfg.model.init_from, path)))
    cfg._given = given
    # Not a field (not saved, not compared): where a relative input path was looked for, so that
    # the trainer's "not found" names that folder too (fmtrain.train._check_inputs).
    cfg._config_file = path
    return cfg


def save_config(cfg: Config, directory: str | os.PathLike, comments: dict[str, str] | None = None) -> Path:
    """Write the resolved ``cfg`` to ``directory/config.toml`` atomically; returns the path.
    ``comments``: ``{"section.field": text}``, a comment line above that field (see :func:`to_toml`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CONFIG_FILE
    tmp = directory / f".{CONFIG_FILE}.{os.getpid()}.tmp"
    tmp.write_text(to_toml(cfg, comments))
    os.replace(tmp, target)
    return target


def to_toml(cfg: Config, comments: dict[str, str] | None = None) -> str:
    """TOML text that :func:`load_config` reads back to an equal config. ``comments`` puts a
    ``# text`` line above a field (``"data.tokenizer"``): what a value alone does not say, such as
    where a tokenizer trained for the run went while ``data.tokenizer`` stays empty."""
    comments = dict(comments or {})
    lines = ["# Resolved fmtrain config (written by fmtrain.config.save_config)."]
    for sec_name, values in cfg.to_dict().items():
        lines.append(f"\n[{sec_name}]")
        for key, value in values.items():
            if value is None:
                continue  # TOML has no null; an absent optional field loads as None
            note = comments.pop(f"{sec_name}.{key}", None)
            if note is not None:
                lines += [f"# {line}" for line in note.splitlines()]  # each line a comment: the TOML stays valid
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    if comments:
        raise ValueError(f"comments for fields the config does not write: {sorted(comments)}")
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


# --------------------------------------------------------------------------- command line
def describe() -> str:
    """Every section and field with its type, default and help (the ``--help`` listing)."""
    out = []
    for sec_name, sec_cls in SECTIONS.items():
        out.append(f"[{sec_name}]")
        hints = _hints(sec_cls)
        default = sec_cls()
        for f in dataclasses.fields(sec_cls):
            value = getattr(default, f.name)
            shown = "none" if value is None else _toml_value(value)
            out.append(f"  --{sec_name}.{f.name}  ({_type_name(hints[f.name])}, default {shown})")
            out.append(f"      {f.metadata.get('help', '')}")
        out.append("")
    return "\n".join(out)


USAGE = ("usage: python -m fmtrain.train CONFIG.toml [--section.field=value ...]\n"
         "  e.g. python -m fmtrain.train configs/tiny-gpt.toml --train.steps=100 --model.attention=sdpa\n")


def config_from_argv(argv: list[str] | None = None) -> Config:
    """``CONFIG [--section.field=value ...]`` -> validated :class:`Config`; ConfigError if not.

    ``-h``/``--help`` prints the field listing and exits 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\nFields (TOML [section] key = value, or --section.field=value):\n\n" + describe())
        raise SystemExit(0)
    if not argv or argv[0].startswith("--"):
        raise ConfigError("the first argument must be a TOML config file\n" + USAGE.rstrip())
    return load_config(argv[0], argv[1:])


def parse_args(argv: list[str] | None = None) -> Config:
    """``CONFIG [--section.field=value ...]`` -> validated :class:`Config`.

    ``-h``/``--help`` prints the field listing and exits; errors exit with status
    2 and the message (as argparse does), printed once under torchrun (rank 0).
    """
    from ..errors import EXIT_USAGE, report

    try:
        return config_from_argv(argv)
    except ConfigError as exc:
        report(str(exc))
        raise SystemExit(EXIT_USAGE) from None


__all__ = ["load_config", "save_config", "from_dict", "apply_overrides", "to_toml", "describe", "parse_args",
           "config_from_argv", "USAGE"]
