"""Config files for the trainer: ``--config FILE`` reads one, and every run writes its own
``output_dir/training_config.toml``.

A file (TOML, or YAML with .yaml/.yml) maps flag names without dashes to values. It becomes command-line
tokens put *before* the real command line, and the whole is parsed once: every value goes through its flag's own
argparse type, choices and range checks (YAML's ``1e-3`` is a string; ``--learning_rate`` still makes it the
float 0.001), and a flag on the command line wins over the file.

    python -m colossal_sd.config_file FILE

prints the flags FILE sets, one a line (switches as ``--flag=true``/``--flag=false``): the run scripts use it so
that their own defaults stand back for what the file sets.
"""

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from colossal_sd.errors import UserError, first_line

SAVED_CONFIG = "training_config.toml"


def parse_with_config(parser: argparse.ArgumentParser, argv, check) -> argparse.Namespace:
    """Parse argv, then `check` the result; with --config FILE, the file's flags go first so that argv's win, and
    a check that refuses a value from the file says so."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="A TOML (.toml) or YAML (.yaml/.yml) file of flag names without dashes and their "
                             "values, e.g. `learning_rate = 1e-4`; flags on the command line win over it. A run's "
                             f"own settings are saved in output_dir/{SAVED_CONFIG}.")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    config = parser.parse_args(argv).config  # argparse itself finds --config (abbreviated or --config=FILE)
    if config is None:
        return check(parser.parse_args(argv))
    tokens = config_tokens(config, parser)
    try:
        return check(parser.parse_args(tokens + argv))
    except UserError as e:
        from_file = [flag for flag in re.findall(r"--\w+", str(e)) if _given(flag, tokens) and not _given(flag, argv)]
        raise UserError(f"{e} (set in {config})" if from_file else str(e)) from None


def _given(flag, tokens) -> bool:
    return any(t == flag or t.startswith(flag + "=") for t in tokens)


def config_tokens(path, parser: argparse.ArgumentParser) -> List[str]:
    """The file as command-line tokens, each value checked by its flag's own argparse action."""
    name = str(path)
    actions = _actions_by_key(parser)
    tokens = []
    for key, value in read_config(path).items():
        if key not in actions:
            raise UserError(f"{name}: unknown key '{key}'{_suggestion(key, actions)}")
        action = actions[key]
        if action.dest == "config":
            raise UserError(f"{name}: a config file cannot name another --config; drop the key '{key}'")
        key_tokens = value_tokens(key, value, action, name)
        _check_tokens(parser, key_tokens, f"{name}: key '{key}'")
        tokens += key_tokens
    return tokens


def value_tokens(key, value, action: argparse.Action, name="config") -> List[str]:
    """`--flag=value`; a switch is present when true; a list gives several values; null leaves the default."""
    flag = action.option_strings[0]
    if value is None:
        return []
    if action.nargs == 0:  # a switch: store_true or --x/--no-x
        if not isinstance(value, bool):
            raise UserError(f"{name}: key '{key}' is a switch: set it to true or false (got {value!r})")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []
    many = action.nargs in ("+", "*")
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not many:
        raise UserError(f"{name}: key '{key}' takes one value, not a list (got {value!r})")
    if any(isinstance(v, (bool, dict, list)) for v in values):  # true/false or a table: YAML's surprises
        raise UserError(f"{name}: key '{key}' takes {'strings or numbers' if many else 'a string or a number'}, "
                        f"not {value!r}")
    return [flag, *map(_text, values)] if many else [f"{flag}={_text(value)}"]  # `=`: a value may start with '-'


def read_config(path) -> Dict:
    """The file's mapping of keys to values; a malformed file is one line naming the file and where."""
    name = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"--config {path}: use a .toml, .yaml or .yml file")
    if not os.path.isfile(path):
        raise UserError(f"--config {path} does not exist")
    try:
        content = _read_toml(path) if suffix == ".toml" else _read_yaml(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text ({first_line(e)})")
    if content is None:  # an empty YAML file
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{name}: must map flag names to values (e.g. `learning_rate: 1e-4`), "
                        f"not hold a {type(content).__name__}")
    return content


def _read_toml(path):
    import tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
            raise UserError(f"{path}: {first_line(e)}")


def _read_yaml(path):
    import yaml
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise UserError(f"{path}: {where}{getattr(e, 'problem', None) or first_line(e)}")


def save_effective_config(args: argparse.Namespace, seed: int):
    """output_dir/training_config.toml: every flag's final value and the seed actually used, so that
    `--config output_dir/training_config.toml` reruns this run. Written atomically (global rank 0)."""
    values = dict(vars(args), seed=seed)
    os.makedirs(args.output_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".toml", dir=args.output_dir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(to_toml(values))
    os.replace(tmp, os.path.join(args.output_dir, SAVED_CONFIG))


def to_toml(values: Dict) -> str:
    """Flat TOML in the flags' order. None (unset; TOML has no null) is left out: it is the default anyway."""
    lines = [f"# The effective settings of a run. Rerun it with --config {SAVED_CONFIG}; flags on the command line",
             "# win (e.g. --output_dir). resume_from_checkpoint and stop_after_steps stay as the run had them."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if key != "config" and value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, once DEL (which TOML wants escaped and JSON leaves) is escaped
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _actions_by_key(parser):
    return {a.option_strings[0][2:]: a for a in parser._actions
            if a.option_strings and a.option_strings[0].startswith("--") and a.dest != "help"}


def _suggestion(key, actions) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), [k for k in actions if k != "config"], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_tokens(parser, tokens, where):
    """Parse one key's tokens alone, turning argparse's usage-and-exit into one line that names the key."""
    def refuse(message):  # "argument --flag: invalid int value: 'two'": the key names the flag already
        raise UserError(f"{where}: {re.sub(r'^argument [^:]*: ', '', message)}")
    import copy
    checker = copy.copy(parser)  # the same flags, its own error()
    checker.error = refuse
    checker.parse_args(tokens)


def flags_set(path) -> List[str]:
    """The flags the file sets, one a line: `--flag`, or `--flag=true`/`--flag=false` for a switch. Null sets
    nothing (it leaves the default)."""
    return [f"--{key}={'true' if value else 'false'}" if isinstance(value, bool) else f"--{key}"
            for key, value in read_config(path).items() if value is not None]


if __name__ == "__main__":
    try:
        print("\n".join(flags_set(sys.argv[1])))
    except UserError:
        sys.exit(1)  # the trainer says what is wrong with the file, in one line
