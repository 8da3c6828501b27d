"""Config files: a YAML recipe of `option: value` pairs read, checked and turned into a command's defaults.

Top-level keys apply to every command that has such an option; a section named after a command
(`extract:`) applies to that command only and wins over top-level keys. A section may list several
steps (a recipe for `tl run`, pipeline.recipe); a command reading such a section by itself says so. Flags given on the command
line win over both (the CLI passes these values to click as defaults). Free of torch.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from pipeline.errors import ConfigError

SCALARS = (str, int, float, bool)
REFERENCE = re.compile(r"(?<!\$)\$\{([^{}]*)\}")  # `$${` is a literal `${`


def csv_list(text: str | None) -> tuple[str, ...]:
    """A comma-separated option's values (none for no text); an empty one (`,`, `fc7,,fc6`, ' ') is kept for the
    stage to refuse: dropped, `--layers ,` silently meant the default layer."""
    return tuple(part.strip() for part in text.split(",")) if text else ()


def read_config(path: Path) -> dict:
    """The YAML mapping in `path`, with one-line errors for a missing, unreadable or malformed file."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass the YAML file in it (such as configs/NAME.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        document = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return document


def command_defaults(path: Path, command: str, options: dict[str, str], known: set[str], sections: set[str],
                     flags: set[str], given: dict | None = None) -> dict:
    """{parameter: value} that the config at `path` sets for `command`.

    `options`: this command's config keys (long flags, `-` as `_`) -> parameter names; `known`: every
    command's keys (a key of another command is fine at the top level); `sections`: the command names;
    `flags`: parameters that are on/off switches (the only ones that take true/false); `given`: {parameter:
    value} of the flags on the command line, which win over the file's keys in `${KEY}` references too."""
    document = read_config(path)
    for parameter, setting in (given or {}).items():
        # as tl run's --set would: the key the command reads, in its section if that sets it, else at the top
        names = {key for key, named in options.items() if named == parameter}
        for node in ([document.get(command)] if isinstance(document.get(command), dict) else []) + [document]:
            spellings = [raw for raw in node if str(raw).replace("-", "_") in names]
            if spellings:  # taken as written: a `${` the user typed refers to nothing
                node[spellings[-1]] = literal(setting)
                break
    document = resolve_references(document, path)
    defaults: dict = {}
    section: dict = {}
    for raw_key, setting in document.items():
        key = str(raw_key).replace("-", "_")
        if str(raw_key) in sections:
            if isinstance(setting, list) and raw_key == command:
                raise ConfigError(f"config file {path}: section {raw_key} lists {len(setting)} steps; run them "
                                  f"with tl run {path} --only {raw_key}")
            if isinstance(setting, list):
                continue
            if not isinstance(setting, dict):
                raise ConfigError(f"config file {path}: section {raw_key} must be a mapping")
            if raw_key == command:
                section = setting
            continue
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key '{raw_key}'; " + (
                close_names(key, known) or f"keys are option names such as {', '.join(sorted(options)[:6])}"))
        if key in options:
            defaults[options[key]] = setting
    for raw_key, setting in section.items():
        key = str(raw_key).replace("-", "_")
        if key not in options:
            close = close_names(key, options)
            raise ConfigError(f"config file {path}: section {command} has unknown key '{raw_key}'"
                              + (f"; {close}" if close else ""))
        defaults[options[key]] = setting
    for parameter, setting in defaults.items():
        if isinstance(setting, bool) and parameter not in flags:  # click would read true as 1
            raise ConfigError(f"config file {path}: '{parameter.rstrip('_')}' takes a value, not "
                              f"{str(setting).lower()}")
        defaults[parameter] = as_flag_value(f"config file {path}", parameter, setting)
    return defaults


def close_names(key: str, names) -> str:
    """'did you mean val_fraction?' for a key one typo away from option names, else ''."""
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(names), n=2, cutoff=0.8)
    return f"did you mean {' or '.join(close)}?" if close else ""


def literal(value):
    """`value` as a config file writes it to be taken as written: each `${` as `$${`."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    return [literal(item) for item in value] if isinstance(value, (list, tuple)) else value


def resolve_references(document: dict, path: Path) -> dict:
    """The document with each `${KEY}` in a text value replaced by the value KEY names as --set names
    keys: `${backbone}` (top level), `${section.key}`, `${section.N.key}` (the N-th step of a list
    section). Outputs named after a setting (`caches/cifar10-${backbone}-train`) keep one cache per
    backbone where `-P backbone=...` would have replaced the one cache the recipe names. A value that is
    one reference alone takes the value as it is (`early_stop: ${fit-head.early_stop}`, a switch);
    `$${` writes `${`."""

    def value_of(name: str, where: str):
        node = document
        for part in name.strip().split("."):
            # a key as the stages read it: `max-epochs` is `max_epochs`, and of two spellings the later
            # wins (a --set spelled otherwise than the file's key is the one the step uses)
            spellings = [key for key in node if str(key).replace("-", "_") == part.replace("-", "_")] \
                if isinstance(node, dict) else []
            if isinstance(node, list) and part.isdecimal() and 1 <= int(part) <= len(node):
                node = node[int(part) - 1]
            elif spellings:
                node = node[spellings[-1]]
            elif isinstance(node, dict) and part == "1" and node is not document:
                continue  # a section of one mapping is its own first step, as for --set section.1.key
            else:
                step = " (a list section: name its step, section.N.key)" if isinstance(node, list) else ""
                raise ConfigError(f"config file {path}: {where} refers to ${{{name}}}, which the file does not "
                                  f"set{step}; set it, or write the value itself")
        if not isinstance(node, SCALARS) or isinstance(node, str) and REFERENCE.search(node):
            what = "refers to another" if isinstance(node, str) else "is not one value"
            raise ConfigError(f"config file {path}: {where} refers to ${{{name}}}, which {what}; refer to a "
                              "key that holds a value itself")
        return node

    def text(node) -> str:
        # a whole float as the number it is: mlflow run passes -P samples_per_class=300 as 300.0, which
        # tl reads as 300 (cli.AMOUNT), and one cache must not get two names
        return str(int(node)) if isinstance(node, float) and node.is_integer() else str(node)

    def resolved(value, where: str):
        if isinstance(value, dict):
            return {key: resolved(item, f"{where}.{key}" if where else str(key)) for key, item in value.items()}
        if isinstance(value, list):
            return [resolved(item, f"{where}.{number}") for number, item in enumerate(value, 1)]
        if isinstance(value, str):
            whole = REFERENCE.fullmatch(value.strip())
            if whole:  # the value as it is; a text's `$${` is a `${` there too
                found = value_of(whole.group(1), where)
                return found.replace("$${", "${") if isinstance(found, str) else found
            return REFERENCE.sub(lambda match: text(value_of(match.group(1), where)), value).replace("$${", "${")
        return value

    return resolved(document, "")


def as_flag_value(where: str, parameter: str, setting):
    """A config value as the flag would give it: a scalar, or a list joined with commas. Anything else
    (an empty value, a mapping where a value belongs) is one line naming the key and `where` it is."""
    if isinstance(setting, (list, tuple)) and all(isinstance(item, SCALARS) for item in setting):
        return ",".join(str(item) for item in setting)
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return str(setting)  # click parses it as from the command line: 1.5 is no integer
    if isinstance(setting, SCALARS):
        return setting
    name = parameter.rstrip("_")
    flag = f"--{name.replace('_', '-')}"
    if isinstance(setting, (list, tuple)):  # a list is taken, of values: name the item that is none
        number, item = next((number, item) for number, item in enumerate(setting, 1) if not isinstance(item, SCALARS))
        kind = "no value" if item is None else f"a {type(item).__name__}"
        raise ConfigError(f"{where}: '{name}' has {kind} as item {number} of its list; give every item a value, "
                          f"as on the command line ({flag} A,B)")
    kind = "no value" if setting is None else f"a {type(setting).__name__}"
    raise ConfigError(f"{where}: '{name}' has {kind}; give it a value as on the command line ({flag} VALUE)")
