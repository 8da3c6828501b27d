"""Config files: a YAML recipe of `option: value` pairs read, checked and turned into a command's defaults.

Top-level keys apply to every command that has such an option; a section named after a command
(`extract:`) applies to that command only and wins over top-level keys. A section may list several
steps (a recipe for `tl run`, pipeline.recipe); a command reading such a section by itself says so. Flags given on the command
line win over both (the CLI passes these values to click as defaults). Free of torch.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError

SCALARS = (str, int, float, bool)


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
                     flags: set[str]) -> dict:
    """{parameter: value} that the config at `path` sets for `command`.

    `options`: this command's config keys (long flags, `-` as `_`) -> parameter names; `known`: every
    command's keys (a key of another command is fine at the top level); `sections`: the command names;
    `flags`: parameters that are on/off switches (the only ones that take true/false)."""
    document = read_config(path)
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
            raise ConfigError(f"config file {path}: unknown key '{raw_key}'; keys are option names such as "
                              f"{', '.join(sorted(options)[:6])}")
        if key in options:
            defaults[options[key]] = setting
    for raw_key, setting in section.items():
        key = str(raw_key).replace("-", "_")
        if key not in options:
            raise ConfigError(f"config file {path}: section {command} has unknown key '{raw_key}'")
        defaults[options[key]] = setting
    for parameter, setting in defaults.items():
        if isinstance(setting, bool) and parameter not in flags:  # click would read true as 1
            raise ConfigError(f"config file {path}: '{parameter.rstrip('_')}' takes a value, not "
                              f"{str(setting).lower()}")
        defaults[parameter] = as_flag_value(f"config file {path}", parameter, setting)
    return defaults


def as_flag_value(where: str, parameter: str, setting):
    """A config value as the flag would give it: a scalar, or a list joined with commas. Anything else
    (an empty value, a mapping where a value belongs) is one line naming the key and `where` it is."""
    if isinstance(setting, (list, tuple)) and all(isinstance(item, SCALARS) for item in setting):
        return ",".join(str(item) for item in setting)
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return str(setting)  # click parses it as from the command line: 1.5 is no integer
    if isinstance(setting, SCALARS):
        return setting
    kind = "no value" if setting is None else f"a {type(setting).__name__}"
    name = parameter.rstrip("_")
    raise ConfigError(f"{where}: '{name}' has {kind}; give it a value as on the command line "
                      f"(--{name.replace('_', '-')} VALUE)")
