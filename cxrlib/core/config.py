"""Loading a parameter file: YAML (``yaml.safe_load``), an ``extends:`` base under it, the
command line's ``--set`` overrides, then validation against the schema
(:class:`cxrlib.core.schema.Params`) before any work starts. An unknown key, a wrong type or a
missing path raises :class:`cxrlib.core.errors.ParamsError` naming the file and the key.
Relative paths are taken from the project folder above ``params/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from cxrlib.core.errors import ParamsError
from cxrlib.core.schema import SPLIT_TAGS, Params

#: ``{xrv}`` in a path stands for torchxrayvision's bundled ``data/`` folder.
XRV_TOKEN = "{xrv}"


def xrv_data_dir() -> Path:
    """torchxrayvision's bundled ``data/`` folder (real metadata CSVs and lung masks)."""
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data"


def resolve_path(value: str, base: Path) -> Path:
    """Expand ``{xrv}``, ``~`` and environment variables; relative paths are taken from base."""
    if XRV_TOKEN in value:
        value = value.replace(XRV_TOKEN, str(xrv_data_dir()))
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else (base / path)


def _format_error(file: Path, err: ValidationError) -> str:
    lines = [f"{file}: invalid parameters"]
    for e in err.errors():
        loc = [p for i, p in enumerate(e["loc"])  # a split's variant tag is no key
               if not (i and e["loc"][i - 1] == "split" and p in SPLIT_TAGS)]
        key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)
        key = key.replace(".[", "[")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and the documented keys in params/demo.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if "input" in e and e["type"] not in ("value_error",):
                msg += f" (got {e['input']!r})"
        lines.append(f"  key '{key or '<top>'}': {msg}")
    return "\n".join(lines)


def _check_paths(params: Params, file: Path) -> None:
    """Every path a reader needs must exist, unless images are not needed for that path."""
    base = file.parent.parent if file.parent.name == "params" else file.parent
    for i, site in enumerate(params.data.sites):
        if site.reader == "phantom":
            continue
        root = resolve_path(site.root or "", base)
        if not root.exists():
            raise ParamsError(
                f"{file}: key 'data.sites[{i}].root': path '{root}' does not exist; "
                f"edit it to point at your copy of the {site.reader} data for site '{site.site}'"
            )
        extras: list[tuple[str, str | None]] = [("demographics", site.demographics)]
        if site.reader == "mimic":
            extras += [
                ("mimic.patients", site.mimic.patients),
                ("mimic.admissions", site.mimic.admissions),
            ]
        for key, value in extras:
            if value and not resolve_path(value, root).exists():
                raise ParamsError(
                    f"{file}: key 'data.sites[{i}].{key}': path "
                    f"'{resolve_path(value, root)}' does not exist"
                )
        for split, name in getattr(site.split, "files", {}).items():
            if not resolve_path(name, base).exists():
                raise ParamsError(
                    f"{file}: key 'data.sites[{i}].split.files.{split}': split file "
                    f"'{resolve_path(name, base)}' does not exist (relative paths are taken "
                    f"from {base}); the paper presets' split files are the authors' (README.md: "
                    "'Your data on GPUs' says where to get them and where to put them)")


#: Dotted keys over a parameter file (``{"run.name": "demo-sde", "sampling.steps": 25}``).
Overrides = dict[str, Any] | None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the command line's ``--set``) as :data:`Overrides`; each value
    is read as YAML (``25`` a number, ``[0, 1]`` a list, ``sde_dpmpp`` a string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. "
                              "--set sampling.steps=25")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ParamsError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return out


#: The top-level key of a parameter file that names the file it builds on.
EXTENDS_KEY = "extends"


def merge_tree(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: mappings merge key by key, anything else (a list, a number)
    replaces the base's value whole."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tree(out[key], value)
        else:
            out[key] = value
    return out


def read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A parameter file's YAML as a mapping, with the file its ``extends:`` key names (relative
    to this file) read first and this file's keys laid over it, so a variant of a preset
    states only what it changes."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ParamsError(f"{path}: '{EXTENDS_KEY}' names one parameter file, relative to "
                          f"this one (e.g. '{EXTENDS_KEY}: demo.yaml'); got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise ParamsError(f"{path}: '{EXTENDS_KEY}: {base}' leads back to itself; "
                          "a parameter file may extend only a file that does not extend it")
    return merge_tree(read_tree(base_path, (*chain, path.resolve())), raw)


def load_params(file: str | os.PathLike[str], overrides: Overrides = None,
                check_paths: bool = True) -> Params:
    """Load and validate a parameter file (with the file its ``extends:`` names under it);
    ``overrides`` are dotted keys (``run.name``). ``check_paths=False`` skips the check that
    the data paths exist (``cxrlib plan`` prices a study before its data are in place)."""
    path = Path(file)
    raw = read_tree(path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[leaf] = value
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(path, err)) from None
    if check_paths:
        _check_paths(params, path.resolve())
    params._source = path.resolve()
    return params


def params_base(params: Params) -> Path:
    """Folder that relative paths in a parameter file are taken from."""
    src = params._source
    if src is None:
        return Path.cwd()
    return src.parent.parent if src.parent.name == "params" else src.parent


def diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return set() if a == b else {prefix or "<top>"}
