"""Config dataclass <-> command-line flags and environment variables, shared by both planes.

Every field of a config dataclass becomes `--field-name`, defaulting to the
environment variable PREFIX + FIELD_NAME, then to the dataclass default.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls, env_prefix: str, helps: dict[str, str],
                         exclude: tuple[str, ...] = ()) -> None:
    for f in fields(config_cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        env_name = env_prefix + f.name.upper()
        env = os.environ.get(env_name)
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        if isinstance(default, bool):
            value = _parse_bool(env) if env is not None else default
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                                help=f"{text} [env {env_name}, default {value}]")
        else:
            kind = type(default)
            value = kind(env) if env is not None else default
            parser.add_argument(flag, type=kind, default=value, metavar=f.name.split("_")[-1].upper(),
                                help=f"{text} [env {env_name}, default {value!r}]")


def config_from_args(config_cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    config = config_cls(**{**values, **overrides})
    config.validate()
    return config


def describe_config(config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def usage_error(prog: str, message: str) -> int:
    """A mistake in the flags: one line on stderr, exit code 2 (argparse's), no usage block of every option."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
