"""Turn a dataclass config, nested configs included, into command-line flags.

Each field becomes ``--field-name`` with the help text from its metadata (``masksd.config.documented``)
and, for a ``Literal`` annotation, its values as ``choices``; a bool field is a switch with both
``--field-name`` and ``--no-field-name``. A nested dataclass field ``lmvsd`` contributes
``--lmvsd-<field>`` flags (its ``enabled`` switch becomes ``--lmvsd``/``--no-lmvsd``);
with ``flatten=True`` in its metadata its flags carry no prefix. Argument destinations are dotted
paths (``masksd.lmvsd.top_k``), the same keys :func:`flatten` gives and presets may use.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar

T = TypeVar("T")

__all__ = [
    "ScriptParser", "USER_ERRORS", "add_dataclass_arguments", "one_line", "run_script", "check_choices", "dataclass_from_args",
    "dataclass_from_dict", "field_help", "flatten", "unflatten", "utf8_text", "worker_died",
]


@dataclasses.dataclass(frozen=True)
class _Flag:
    dest: str
    """Dotted path of the field from the top-level config."""
    flag: str
    """The flag without its leading dashes (and without ``no-`` for switches that default to True)."""
    help: str
    annotation: Any


def _scalar(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def _flags(cls: type, dest: str = "", prefix: str = "", parent_help: str = "") -> Iterator[_Flag]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, _ = _scalar(hints[f.name])
        path, help_text = f"{dest}{f.name}", f.metadata.get("help", "")
        if dataclasses.is_dataclass(kind):
            inner = prefix if f.metadata.get("flatten") else f"{prefix}{f.name}-"
            yield from _flags(kind, f"{path}.", inner, help_text)
        elif f.name == "enabled" and prefix and kind is bool:  # a nested config's on/off switch, named after it
            yield _Flag(path, prefix.rstrip("-"), parent_help or help_text, hints[f.name])
        else:
            yield _Flag(path, f"{prefix}{f.name}".replace("_", "-"), help_text, hints[f.name])


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` (``masksd.config.documented``), for a script that
    adds that one flag by hand."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["help"]
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def check_choices(config: Any) -> None:
    """Raise a ValueError naming the field unless each ``Literal``-annotated field of the dataclass
    instance ``config`` (not its nested configs, which check themselves) holds one of its values."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        kind, optional = _scalar(hints[f.name])
        value = getattr(config, f.name)
        if typing.get_origin(kind) is Literal and not (optional and value is None) and value not in typing.get_args(kind):
            raise ValueError(f"{f.name} must be one of {typing.get_args(kind)}, got {value!r}")


def _parser_for(kind: Any, optional: bool):
    def parse(text: str):
        return None if optional and text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per (nested) field of ``cls``; defaults are ``cls()``'s, set with ``parser.set_defaults``
    (so presets can override them there, by dotted path)."""
    defaults = flatten(cls())
    for spec in _flags(cls):
        kind, optional = _scalar(spec.annotation)
        help_text = spec.help.replace("%", "%%") + " (default: %(default)s)"
        metavar = spec.flag.split("-", 1)[-1].upper().replace("-", "_")
        if kind is bool:  # both --x and --no-x, so that a flag can undo what a preset set
            parser.add_argument(f"--{spec.flag}", dest=spec.dest, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is Literal:
            values = typing.get_args(kind)
            choices = (*values, None) if optional else values
            parser.add_argument(f"--{spec.flag}", dest=spec.dest, type=_parser_for(str, optional), choices=choices,
                                metavar="{" + ",".join(values) + "}", help=help_text)
        else:
            parser.add_argument(f"--{spec.flag}", dest=spec.dest, type=_parser_for(kind, optional), metavar=metavar, help=help_text)
    parser.set_defaults(**defaults)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) dataclass instance, or the nested dict ``asdict`` makes of one -> {dotted path: value}."""
    items = config.items() if isinstance(config, dict) else ((f.name, getattr(config, f.name)) for f in dataclasses.fields(config))
    out: dict[str, Any] = {}
    for name, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{dotted path: value} -> the nested dict :func:`dataclass_from_dict` takes."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return nested


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config the parsed flags describe (dotted destinations rebuilt into nested dataclasses)."""
    known = flatten(cls())
    return dataclass_from_dict(cls, unflatten({k: v for k, v in vars(args).items() if k in known}))  # not --preset


def dataclass_from_dict(cls: type[T], values: dict[str, Any], *, source: str = "config") -> T:
    """Build ``cls`` from a (nested) dict such as ``dataclasses.asdict`` gives; keys that are not
    fields (from another version of the config) are dropped with a warning naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and source:
        warnings.warn(f"{source}: ignoring settings this version does not know: {unknown}", stacklevel=2)
    kwargs = {}
    for name in names & set(values):
        kind, _ = _scalar(hints[name])
        value = values[name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = dataclass_from_dict(kind, value, source=f"{source}.{name}")
        elif isinstance(value, list):  # JSON and torch.save turn tuples into lists
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


USER_ERRORS = (ValueError, OSError, ImportError)
"""What a script's user can cause and fix (a bad value, a missing or corrupt file, a missing extra): one
line, exit status 2. Anything else (a TypeError, a RuntimeError) is a bug and keeps its traceback."""


class ScriptParser(argparse.ArgumentParser):
    """argparse for the scripts: a usage error is one line on stderr (exit status 2), and ``--debug``
    (added to every script) makes :func:`run_script` show the traceback of an error instead."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # run_script looks for --debug itself: no --deb standing in for it
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


INTERRUPTED = 130
"""The exit status of a script stopped by Ctrl-C (SIGINT), as a shell reports a process killed by it."""


def run_script(main: typing.Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Run a script's ``main(argv)`` and return what it returns: a user error (:data:`USER_ERRORS`, also when
    raised in a DataLoader worker) or a data-loading worker that died (:func:`worker_died`) becomes one
    line on stderr that names what was wrong, and exit status 2; Ctrl-C one line and status 130. With
    ``--debug`` the error propagates with its traceback."""
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "masksd"
    try:
        return main(argv)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print(f"{prog}: interrupted; a training run continues from its last checkpoint with --resume auto", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except (*USER_ERRORS, RuntimeError) as error:
        died = worker_died(error) if isinstance(error, RuntimeError) else None
        if "--debug" in argv or (isinstance(error, RuntimeError) and died is None):
            raise  # a RuntimeError other than a dead worker is a bug: its traceback stays
        print(f"{prog}: error: {died or one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? [\d, ]+\) (?:exited unexpectedly|is killed by signal: [^.]*)")
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def worker_died(error: BaseException) -> str | None:
    """For the RuntimeError a DataLoader raises when one of its worker processes dies (killed by the OOM
    killer, a signal, a crash), one line saying so and what to do; None for any other error."""
    found = _WORKER_DIED.search(str(error))
    if found is None:
        return None
    return (f"a data-loading worker died ({found.group(0)}): out of memory? Lower --workers or --batch-size; a "
            f"training run continues from its last checkpoint with --resume auto")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a FileNotFoundError from open() names its file too). An error
    raised in a DataLoader worker, whose message is the worker's whole traceback, becomes the worker's own
    error message, as the same error says it without workers."""
    text = str(error) or type(error).__name__
    if _WORKER_TRACEBACK.match(text):
        text = _last_exception(text) or text
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(text.split())


def _last_exception(traceback_text: str) -> str:
    """The message of the last exception in a formatted traceback (after its frames, without its type)."""
    lines = traceback_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip().endswith("Traceback (most recent call last):")]
    if not starts:
        return ""
    rest = lines[starts[-1] + 1:]
    while rest and (not rest[0].strip() or rest[0].startswith((" ", "\t"))):  # the frames: indented
        rest = rest[1:]
    message = "\n".join(rest).strip()
    return re.sub(r"^[\w.]+(?:Error|Exception|Warning|Interrupt)?: ", "", message, count=1) if ": " in message else message


def utf8_text(text: str) -> str:
    """An argparse ``type`` for text given on the command line: refuses bytes that are not UTF-8 (Python keeps
    them as lone surrogates, which a tokenizer would turn into U+FFFD) with the byte and its position."""
    for position, char in enumerate(text):
        if "\udc80" <= char <= "\udcff":
            raise argparse.ArgumentTypeError(
                f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text (byte 0x{ord(char) - 0xDC00:02x} at "
                f"character {position}): pass the text in UTF-8"
            )
    return text
