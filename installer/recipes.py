"""Recipes and pins: TOML files loaded into frozen dataclasses.

Recipes are data. A recipe names its source, patches, environment and steps
(argv lists or named builtin actions); every version lives in pins.toml. This
module rejects unknown keys and missing fields naming the file and the key, and
does the `{placeholder}` interpolation.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import RecipeError, UsageError

PINS_FILE = "pins.toml"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z0-9_.-]+)\}")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def _package_data(name: str) -> Path:
    """recipes/ and patches/ ship inside the wheel; in a checkout they sit beside installer/."""
    here = Path(__file__).resolve().parent
    inside = here / name
    return inside if inside.is_dir() else here.parent / name


def default_recipes_dir() -> Path:
    return _package_data("recipes")


def patches_dir_for(recipes_dir: Path) -> Path:
    return recipes_dir.parent / "patches"


@dataclass(frozen=True)
class Source:
    kind: str                  # url | git | index
    url: str = ""
    sha256: str = ""
    tag: str = ""
    commit: str = ""
    index_url: str = ""
    packages: tuple[tuple[str, str], ...] = ()   # (name, exact version) for kind=index

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", ())}


@dataclass(frozen=True)
class Step:
    name: str
    run: tuple[str, ...] = ()
    action: str = ""
    args: tuple[tuple[str, Any], ...] = ()        # the `with` table
    when: tuple[tuple[str, str], ...] = ()        # pin == value conditions
    cwd: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str = ""
    version: str = ""
    depends: tuple[str, ...] = ()
    resolver: str = ""
    keep_work: bool = False
    disk_gb: float = 0.0           # rough disk need, for doctor's free-space check
    when: tuple[tuple[str, str], ...] = ()
    source: Source | None = None
    patches: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    steps: tuple[Step, ...] = ()
    check: Step | None = None
    outputs: Mapping[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# --- loading -----------------------------------------------------------------

def _read_toml(path: Path) -> dict[str, Any]:
    from . import bounded

    try:
        text = bounded.read(path, bounded.PINS_LIMIT).decode("utf-8")
    except bounded.Unreadable as exc:
        if exc.missing:
            raise UsageError(f"file not found: {path}") from None
        raise UsageError(f"{path} {exc}", hint="name a TOML file (--pins FILE or RDNA4_PINS=FILE)") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})",
                          hint="save it as UTF-8; TOML files are UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}", hint="fix the file's syntax") from None


def _check_keys(where: str, table: Mapping[str, Any], allowed: set[str], required: set[str] = set()) -> None:
    for key in table:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r}",
                              hint=f"allowed keys: {', '.join(sorted(allowed))}")
    for key in sorted(required):
        if key not in table:
            raise RecipeError(f"{where}: missing required key {key!r}")


def _typed(where: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind):
        raise RecipeError(f"{where}: {what} must be {getattr(kind, '__name__', kind)}, "
                          f"not {type(value).__name__}")
    return value


def _str_list(where: str, value: Any, what: str) -> tuple[str, ...]:
    _typed(where, value, list, what)
    for item in value:
        _typed(where, item, str, f"each item of {what}")
    return tuple(value)


def _when(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    _typed(where, value, dict, "when")
    return tuple((k, str(v)) for k, v in sorted(value.items()))


def _step(where: str, data: Any, default_name: str) -> Step:
    _typed(where, data, dict, "a step")
    _check_keys(where, data, {"name", "run", "action", "with", "when", "cwd"})
    if ("run" in data) == ("action" in data):
        raise RecipeError(f"{where}: a step needs exactly one of 'run' (argv list) or 'action'")
    if "run" in data and isinstance(data["run"], str):
        raise RecipeError(f"{where}: 'run' must be an argv list, not a shell string",
                          hint='write run = ["cmd", "arg", ...]')
    run = _str_list(where, data["run"], "run") if "run" in data else ()
    if "run" in data and not run:
        raise RecipeError(f"{where}: 'run' is empty")
    args = _typed(where, data.get("with", {}), dict, "with")
    return Step(name=_typed(where, data.get("name", default_name), str, "name"),
                run=run, action=_typed(where, data.get("action", ""), str, "action"),
                args=tuple(sorted(args.items())), when=_when(where, data.get("when", {})),
                cwd=_typed(where, data.get("cwd", ""), str, "cwd"))


def _outputs(where: str, data: Any) -> dict[str, tuple[str, ...]]:
    from .outputs import KINDS

    _typed(where, data, dict, "[outputs]")
    _check_keys(f"{where} [outputs]", data, set(KINDS))
    return {k: _str_list(where, v, f"outputs.{k}") for k, v in data.items()}


_SOURCE_KEYS = {
    "url": ({"kind", "url", "sha256"}, {"url"}),
    "git": ({"kind", "url", "tag", "commit"}, {"url", "commit"}),
    "index": ({"kind", "url", "packages"}, {"url", "packages"}),
}


def _source(where: str, data: Any) -> Source:
    _typed(where, data, dict, "[source]")
    kind = data.get("kind")
    if kind not in _SOURCE_KEYS:
        raise RecipeError(f"{where}: [source] kind must be one of url, git, index; got {kind!r}")
    allowed, required = _SOURCE_KEYS[kind]
    _check_keys(f"{where} [source]", data, allowed, required | {"kind"})
    if kind == "index":
        pk = _typed(where, data["packages"], dict, "[source] packages")
        return Source(kind=kind, index_url=str(data["url"]),
                      packages=tuple((k, str(v)) for k, v in pk.items()))
    return Source(kind=kind, url=str(data["url"]), sha256=str(data.get("sha256", "")),
                  tag=str(data.get("tag", "")), commit=str(data.get("commit", "")))


def load_recipe(path: Path) -> Recipe:
    data = _read_toml(path)
    where = str(path)
    _check_keys(where, data, {"recipe", "source", "env", "steps", "check", "outputs"}, {"recipe"})
    head = _typed(where, data["recipe"], dict, "[recipe]")
    _check_keys(f"{where} [recipe]", head,
                {"name", "description", "version", "depends", "resolver", "keep_work", "when",
                 "patches", "disk_gb"},
                {"name"})
    name = _typed(where, head["name"], str, "name")
    if not NAME_RE.match(name):
        # names become folder and file names under the prefix
        raise RecipeError(f"{where}: recipe name {name!r} must be lowercase letters, digits and '-'")
    if name != path.stem:
        raise RecipeError(f"{where}: recipe name {name!r} must match the file name {path.stem!r}")
    env = _typed(where, data.get("env", {}), dict, "[env]")
    for k, v in env.items():
        _typed(f"{where} [env] {k}", v, str, "an env value")
    steps = _typed(where, data.get("steps", []), list, "steps")
    return Recipe(
        name=name, path=path,
        description=_typed(where, head.get("description", ""), str, "description"),
        version=_typed(where, head.get("version", ""), str, "version"),
        depends=_str_list(where, head.get("depends", []), "depends"),
        resolver=_typed(where, head.get("resolver", ""), str, "resolver"),
        keep_work=_typed(where, head.get("keep_work", False), bool, "keep_work"),
        disk_gb=float(_typed(where, head.get("disk_gb", 0), (int, float), "disk_gb")),
        when=_when(where, head.get("when", {})),
        source=_source(where, data["source"]) if "source" in data else None,
        patches=_str_list(where, head.get("patches", []), "patches"),
        env=tuple(sorted(env.items())),
        steps=tuple(_step(f"{where} step {i + 1}", s, f"step {i + 1}") for i, s in enumerate(steps)),
        check=_step(f"{where} [check]", data["check"], "check") if "check" in data else None,
        outputs=_outputs(where, data.get("outputs", {})),
        raw=data,
    )


def load_recipes(recipes_dir: Path) -> dict[str, Recipe]:
    if not recipes_dir.is_dir():
        raise UsageError(f"recipes directory not found: {recipes_dir}")
    recipes = {}
    for path in sorted(recipes_dir.glob("*.toml")):
        if path.name == PINS_FILE:
            continue
        recipe = load_recipe(path)
        recipes[recipe.name] = recipe
    for recipe in recipes.values():
        for dep in recipe.depends:
            if dep not in recipes:
                raise RecipeError(f"{recipe.path}: depends on unknown recipe {dep!r}")
    return recipes


# --- pins ----------------------------------------------------------------------

Pins = dict[str, dict[str, Any]]


def load_pins(path: Path) -> Pins:
    data = _read_toml(path)
    for table, values in data.items():
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: pin {table!r} must be inside a [recipe] table")
        for key, value in values.items():
            if not isinstance(value, (str, int, float, bool)):
                raise RecipeError(f"{path}: pin {table}.{key} must be a string, number or boolean")
    return data


def _derivable(table: str, name: str) -> bool:
    from .actions import DERIVED

    return name in DERIVED.get(table, ())


def _set_pin(pins: Pins, key: str, value: Any, origin: str) -> None:
    table, _, name = key.partition(".")
    if not name or table not in pins or name not in pins[table]:
        known = ", ".join(f"{t}.{k}" for t in sorted(pins) for k in pins[t])
        raise UsageError(f"{origin}: unknown pin {key!r}",
                         hint=f"pins are RECIPE.KEY, one of: {known}")
    if value == "" and pins[table][name] != "" and not _derivable(table, name):
        # only pins that are empty by default, or that a resolver derives, mean something
        # when empty (e.g. therock.sha256, vllm.sdist_url)
        raise UsageError(f"{origin}: pin {key} is empty; it needs a value",
                         hint=f"drop the override, or use the default: --set {key}={pins[table][name]}")
    pins[table][name] = value


def apply_overrides(pins: Pins, *, pins_file: Path | None = None, sets: tuple[str, ...] = (),
                    origins: dict[str, str] | None = None) -> Pins:
    """Overlay a user's pins file, then `--set RECIPE.KEY=VALUE` items, on the pins.
    `origins` (if given) gets, per overridden RECIPE.KEY, where its value came from."""
    out = {t: dict(v) for t, v in pins.items()}
    origins = origins if origins is not None else {}
    if pins_file is not None:
        for table, values in load_pins(pins_file).items():
            for key, value in values.items():
                _set_pin(out, f"{table}.{key}", value, str(pins_file))
                origins[f"{table}.{key}"] = str(pins_file)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--set {item!r}: expected RECIPE.KEY=VALUE",
                             hint="for example --set vllm.version=0.33.0")
        _set_pin(out, key.strip(), value.strip(), "--set")
        origins[key.strip()] = f"--set {item}"
    return out


# --- interpolation -------------------------------------------------------------

def interpolate(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    """Replace `{name}` in strings (recursively in lists/dicts); `{{`/`}}` escape braces."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) in ("{{", "}}"):
                return m.group(0)[0]
            key = m.group(1)
            if key not in variables:
                raise RecipeError(f"{where}: unknown placeholder {{{key}}}",
                                  hint="placeholders are pins (recipe.key) or prefix, work, src, "
                                       "cache, rocm, venv, python, uv, archs, arch_list, jobs, patches, "
                                       "visible_devices, editable")
            return str(variables[key])
        return _PLACEHOLDER.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, variables, where) for v in value]
    if isinstance(value, tuple):
        return tuple(interpolate(v, variables, where) for v in value)
    if isinstance(value, dict):
        return {k: interpolate(v, variables, where) for k, v in value.items()}
    return value


def unmet(conds: tuple[tuple[str, str], ...], variables: Mapping[str, str], where: str) -> str:
    """Why a `when` table does not hold ("" when it does). "!x" means "anything but x"."""
    for key, want in conds:
        if key not in variables:
            raise RecipeError(f"{where}: 'when' names unknown pin {key!r}")
        have = variables[key]
        if want.startswith("!") and have == want[1:]:
            return f"{key} is {have}"
        if not want.startswith("!") and have != want:
            return f"{key} is {have}, not {want}"
    return ""


def placeholders(value: Any) -> set[str]:
    """Every placeholder name used anywhere in a recipe's raw data."""
    found: set[str] = set()
    if isinstance(value, str):
        found.update(m.group(1) for m in _PLACEHOLDER.finditer(value) if m.group(1))
    elif isinstance(value, (list, tuple)):
        for v in value:
            found |= placeholders(v)
    elif isinstance(value, dict):
        for v in value.values():
            found |= placeholders(v)
    return found


def pin_vars(pins: Pins) -> dict[str, str]:
    return {f"{t}.{k}": str(v).lower() if isinstance(v, bool) else str(v)
            for t, vals in pins.items() for k, v in vals.items()}
