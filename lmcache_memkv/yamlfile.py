"""Settings files: one YAML mapping, with errors that name where the file was given."""

from __future__ import annotations

from typing import Any


def load_mapping(path: str, source: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` ({} if empty); ValueError naming ``source`` (the flag or
    variable that gave the path) and the path for an unreadable, invalid or non-mapping file."""
    import yaml  # only when a settings file is given

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{source}: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{source} {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{source} {path}: expected a mapping of setting names to values, got {type(data).__name__}")
    return data
