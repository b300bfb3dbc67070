"""``key=value`` argument parsing for the evaluate, predict and export commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cellcls.errors import DISK_ERRORS, ConfigError, describe_os_error, printable


def command_args(argv: Sequence[str] | None, doc: str | None) -> tuple[list[str], int | None]:
    """The command's arguments, or an exit code after printing its help (0 for --help, 2 for no arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(doc)
        return args, 0 if args else 2
    return args, None


def parse_key_values(argv: Sequence[str], allowed: Sequence[str], required: Sequence[str] = (),
                     sections: Sequence[str] = ("dataset",)) -> tuple[dict[str, str], list[str]]:
    """Split ``argv`` into the command's own settings and overrides of ``sections`` (``dataset.<key>=...``);
    unknown keys are errors."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    more = ", ".join(f"{s}.<key>" for s in sections)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {arg!r}; settings: {', '.join(allowed)}, {more}")
        if key.startswith(tuple(f"{s}." for s in sections)):
            overrides.append(arg)
        elif key in allowed:
            own[key] = value
        else:
            raise ConfigError(f"unknown setting {key!r}; allowed: {', '.join(allowed)}, {more}")
    missing = [k for k in required if k not in own]
    if missing:
        raise ConfigError(f"missing setting(s): {', '.join(f'{k}=...' for k in missing)}")
    return own, overrides


def own_settings(argv: Sequence[str], allowed: Sequence[str], command: str, required: Sequence[str] = ()) -> dict[str, str]:
    """:func:`parse_key_values` for a command that takes no ``dataset.*`` overrides."""
    own, overrides = parse_key_values(argv, allowed, required)
    if overrides:
        raise ConfigError(f"{command} takes no dataset settings, got {overrides}")
    return own


def split_own(argv: Sequence[str], own: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """A command's own ``key=value`` settings (keys in ``own``) and everything else, passed on as training overrides
    (audit, tune)."""
    settings = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[0] in own}
    return settings, [a for a in argv if a.split("=", 1)[0] not in own]


def whole_number(name: str, value: object, minimum: int) -> int:
    """A command's ``name=<value>`` setting as a whole number of at least ``minimum``."""
    text = str(value)
    if not text.isdigit() or int(text) < minimum:
        raise ConfigError(f"{name}={value} must be a whole number >= {minimum}")
    return int(text)


def as_bool(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not valid; allowed values: true, false")


def fail(exc: BaseException) -> int:
    """Print the one ``cellcls: error:`` line for ``exc``; returns the exit code 2."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        message = describe_os_error(exc)
    else:
        message = str(exc)
    print(f"cellcls: error: {printable(message)}", file=sys.stderr)
    return 2


def check_writable(folder: Path) -> None:
    """Make ``folder`` and write (then remove) a 64 KiB file in it, so a read-only or full disk is said before any
    work, naming the folder; raises ConfigError with that line."""
    import os
    import tempfile

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder: choose a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(bytes(65536))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        exc.filename = str(folder)  # not the probe's temporary name
        raise ConfigError(describe_os_error(exc)) from None


def tolerant_log_files() -> None:
    """Let every log handler write any file name: a name that is not valid UTF-8 (held as surrogate escapes)
    is written as ``\\udcxx`` instead of raising inside logging (which drops the message and prints a traceback)."""
    import logging

    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def log_like_training() -> None:
    """INFO logging in the training command's (Hydra's) line format, for commands that run training outside Hydra
    (tune, lr_find); left alone when the caller configured logging already."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
