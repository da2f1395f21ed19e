"""Resolve: recipes + pins + target -> an ordered plan of will-run / skip items.

Each item's fingerprint hashes everything that should force a rebuild when it
changes: the recipe after pin substitution, the pins it uses, its patch
contents, its env, its source identity, the target arches and the fingerprints
of the recipes it depends on. Paths of the prefix and the job count are left
out on purpose: moving `--jobs` must not rebuild vLLM.
"""

from __future__ import annotations

import graphlib
import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import outputs, proc
from . import recipes as rcp
from . import state
from .errors import RecipeError, UsageError, command
from .patches import for_version
from . import targetprofile

RUN, SKIP = "run", "skip"
CONTEXT_VARS = ("prefix", "work", "src", "cache", "rocm", "venv", "python", "uv",
                "archs", "arch_list", "jobs", "patches", "visible_devices", "editable",
                "gpu_count", "peer_access")
# context values that change what a recipe produces, so they stay in its fingerprint
# (the others are paths or parallelism, which must not force a rebuild)
FINGERPRINTED = ("visible_devices", "editable", "gpu_count", "peer_access")


@dataclass
class Settings:
    prefix: Path
    cache_dir: Path
    recipes_dir: Path
    archs: tuple[str, ...]
    pins: rcp.Pins
    jobs: int | None = None
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    without: tuple[str, ...] = ()     # optional components left out (--without)
    targets: tuple[str, ...] = ()     # `run RECIPE...`
    force: bool = False
    adopt: bool = False               # --force: accept a non-empty prefix the installer did not create
    offline: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    pin_origins: dict[str, str] = field(default_factory=dict)   # RECIPE.KEY -> "--set ..." / pins file
    sets: tuple[str, ...] = ()        # the --set RECIPE.KEY=VALUE overrides, as given (rerun hints repeat them)
    pins_file: Path | None = None     # --pins
    target: str = ""                  # the target profile (recipes/targets/<name>.toml); "" = none


@dataclass
class Item:
    recipe: rcp.Recipe
    action: str
    reason: str
    fingerprint: str = ""
    inputs: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, str] = field(default_factory=dict)
    patches: tuple[Path, ...] = ()
    outputs: dict[str, list[str]] = field(default_factory=dict)   # prefix-relative, for the stamp
    notes: list[str] = field(default_factory=list)   # shown with the plan

    @property
    def name(self) -> str:
        return self.recipe.name

    def to_json(self, verbose: bool = True) -> dict[str, Any]:
        out = {"recipe": self.name, "action": self.action, "reason": self.reason,
               "version": self.vars.get("_version", ""), "fingerprint": self.fingerprint}
        if verbose:
            out["depends"] = list(self.recipe.depends)
            out["pins"] = self.inputs.get("pins", {})
            out["source"] = self.inputs.get("source", {})
            out["patches"] = self.inputs.get("patches", {})
            out["env"] = self.inputs.get("env", {})
            out["notes"] = list(self.notes)
        return out


@dataclass
class Plan:
    settings: Settings
    items: list[Item]
    pins: rcp.Pins

    @property
    def to_run(self) -> list[Item]:
        return [i for i in self.items if i.action == RUN]

    def to_json(self, verbose: bool = True) -> dict[str, Any]:
        s = self.settings
        return {"prefix": str(s.prefix), "archs": list(s.archs), "target": s.target,
                "steps": [i.to_json(verbose) for i in self.items]}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _hash_json(data: Any) -> str:
    return _sha256_text(json.dumps(data, sort_keys=True, default=str))


def context_vars(settings: Settings, name: str) -> dict[str, str]:
    prefix = settings.prefix
    work = state.work_root(prefix) / name
    jobs = settings.jobs or os.cpu_count() or 1
    return {
        "prefix": str(prefix), "work": str(work), "src": str(work / "src"),
        "cache": str(settings.cache_dir), "rocm": str(prefix / "rocm"),
        "venv": str(prefix / "venv"), "python": str(prefix / "venv" / "bin" / "python"),
        "uv": proc.find_uv() or "uv", "archs": ",".join(settings.archs), "arch_list": ";".join(settings.archs),
        "jobs": str(jobs), "patches": str(rcp.patches_dir_for(settings.recipes_dir) / name),
        **{name: _option(settings, name) for name in FINGERPRINTED},
    }


def _option(settings: Settings, name: str) -> str:
    value = settings.options.get(name, "")
    return str(value).lower() if isinstance(value, bool) else str(value or "")


def dependency_order(recipes: dict[str, rcp.Recipe]) -> list[str]:
    """Dependency order; ties broken by name so the plan reads the same every time."""
    sorter = graphlib.TopologicalSorter({n: r.depends for n, r in recipes.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise RecipeError(f"recipes depend on each other in a cycle: {' -> '.join(exc.args[1])}") from None
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        order.extend(ready)
        sorter.done(*ready)
    return order


def switched_off(recipes: dict[str, rcp.Recipe], pins: rcp.Pins,
                 recorded: rcp.Pins | None = None) -> set[str]:
    """Recipes whose `when` fails under `pins` overlaid with a receipt's `recorded` pins
    (optional components nobody asked for: `--with ray`, flash-attention backend none)."""
    merged = {t: dict(v) for t, v in pins.items()}
    for table, values in (recorded or {}).items():
        merged.setdefault(table, {}).update(values)
    variables = rcp.pin_vars(merged)
    return {n for n, r in recipes.items() if r.when and rcp.unmet(r.when, variables, str(r.path))}


def _descendants(recipes: dict[str, rcp.Recipe], roots: set[str]) -> set[str]:
    out = set(roots)
    changed = True
    while changed:
        changed = False
        for name, recipe in recipes.items():
            if name not in out and any(d in out for d in recipe.depends):
                out.add(name)
                changed = True
    return out


def _check_names(kind: str, names: tuple[str, ...], recipes: dict[str, rcp.Recipe]) -> None:
    for n in names:
        if n not in recipes:
            raise UsageError(f"unknown recipe {n!r} in {kind}",
                             hint=f"recipes are: {', '.join(sorted(recipes))}")


def _resolve(recipe: rcp.Recipe, pins: rcp.Pins, settings: Settings) -> None:
    from .actions import RESOLVERS

    target = RESOLVERS.get(recipe.resolver)
    if target is None:
        raise RecipeError(f"{recipe.path}: unknown resolver {recipe.resolver!r}",
                          hint=f"known resolvers: {', '.join(sorted(RESOLVERS)) or 'none'}")
    module, _, func = target.partition(":")
    fn = getattr(importlib.import_module(module), func)
    found = fn(pins, settings.archs, offline=settings.offline, cache_dir=settings.cache_dir)
    pins.setdefault(recipe.name, {}).update({k: str(v) for k, v in found.items()})


def _unresolved(value: Any) -> bool:
    text = str(value)
    return text in ("", "auto") or text.startswith("latest")


def _patch_files(recipe: rcp.Recipe, settings: Settings) -> tuple[Path, ...]:
    folder = rcp.patches_dir_for(settings.recipes_dir) / recipe.name
    if "patches" not in recipe.raw.get("recipe", {}):
        return tuple(sorted(folder.glob("*.patch")))
    files = []
    for name in recipe.patches:
        path = folder / name
        if not path.is_file():
            raise RecipeError(f"{recipe.path}: patch {name!r} not found in {folder}")
        files.append(path)
    return tuple(files)


def _inputs(recipe: rcp.Recipe, pin_values: dict[str, str], settings: Settings,
            patches: tuple[Path, ...], dep_fps: dict[str, str]) -> dict[str, Any]:
    where = str(recipe.path)
    symbolic = dict(pin_values)
    symbolic.update({v: "{" + v + "}" for v in CONTEXT_VARS if v not in FINGERPRINTED})
    for name in FINGERPRINTED:
        symbolic[name] = _option(settings, name)
    used = {k for k in rcp.placeholders(recipe.raw) if k not in CONTEXT_VARS}
    used |= {k for k in pin_values if k.startswith(recipe.name + ".")}
    # [outputs] says what to look for, not how to build: declaring one must not rebuild
    body = rcp.interpolate({k: v for k, v in recipe.raw.items() if k != "outputs"}, symbolic, where)
    source = rcp.interpolate(recipe.source.identity(), symbolic, where) if recipe.source else {}
    if source.get("kind") == "git" and not re.fullmatch(r"[0-9a-f]{40}", source.get("commit", "")):
        raise RecipeError(f"{_blame(recipe, 'commit', settings)}: git commit {source.get('commit')!r} "
                          "is not a full 40-hex SHA",
                          hint="pin sources by full commit SHA, never a branch or short id")
    if source.get("kind") == "url" and source.get("sha256") and \
            not re.fullmatch(r"[0-9a-f]{64}", source["sha256"]):
        raise RecipeError(f"{_blame(recipe, 'sha256', settings)}: sha256 {source['sha256']!r} "
                          "is not 64 hex digits")
    return {
        "recipe": _hash_json(body),
        "pins": {k: pin_values[k] for k in sorted(used) if k in pin_values},
        "patches": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in patches},
        "env": dict(rcp.interpolate(dict(recipe.env), symbolic, where)),
        "source": source,
        "archs": list(settings.archs),
        "deps": dep_fps,
    }


def _blame(recipe: rcp.Recipe, field_name: str, settings: Settings) -> str:
    """Where a bad source value came from: the override that set it, else the file."""
    keys = rcp.placeholders(getattr(recipe.source, field_name, ""))
    for key in sorted(keys):
        if key in settings.pin_origins:
            return f"{settings.pin_origins[key]} (pin {key})"
    if keys:
        return f"{settings.recipes_dir / rcp.PINS_FILE} (pin {', '.join(sorted(keys))})"
    return str(recipe.path)


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Say which input moved, most specific first."""
    def diff(kind: str) -> list[str]:
        a, b = old.get(kind) or {}, new.get(kind) or {}
        keys = sorted(set(a) | set(b))
        return [k for k in keys if a.get(k) != b.get(k)]

    if moved := diff("pins"):
        # a version the user changed explains more than the URL it resolved to
        k = sorted(moved, key=lambda key: (not key.endswith(".version"), key))[0]
        return f"pin {k}: {old.get('pins', {}).get(k, '-')} -> {new['pins'].get(k, '-')}"
    if moved := diff("patches"):
        return "patches changed: " + ", ".join(moved)
    if moved := diff("env"):
        return "env changed: " + ", ".join(moved)
    if old.get("archs") != new.get("archs"):
        return f"target changed: {','.join(map(str, old.get('archs') or []))} -> {','.join(new['archs'])}"
    if old.get("source") != new.get("source"):
        return "source changed"
    if moved := diff("deps"):
        return "dependency rebuilt: " + ", ".join(moved)
    if old.get("recipe") != new.get("recipe"):
        return "recipe file changed"
    return "inputs changed"


def selection(settings: Settings, recipes: dict[str, rcp.Recipe] | None = None) -> set[str]:
    """The recipes this run may touch: `run` targets and their dependents, narrowed by
    --only, minus --skip. Checked before anything is written (the engine calls it first)."""
    recipes = recipes if recipes is not None else rcp.load_recipes(settings.recipes_dir)
    for kind, names in (("--only", settings.only), ("--skip", settings.skip),
                        ("--without", settings.without), ("run", settings.targets)):
        _check_names(kind, names, recipes)
    active = _descendants(recipes, set(settings.targets)) if settings.targets else set(recipes)
    if settings.only:
        active &= set(settings.only)
    active -= set(settings.skip) | set(settings.without)
    if not active:
        raise UsageError("nothing is selected: --only/--skip/--without (or run's recipes) leave out "
                         "every recipe", hint="name a recipe in --only that no --skip/--without names")
    return active


def make_plan(settings: Settings) -> Plan:
    recipes = rcp.load_recipes(settings.recipes_dir)
    active = selection(settings, recipes)
    pins = {t: dict(v) for t, v in settings.pins.items()}
    order = dependency_order(recipes)
    stamps = state.all_stamps(settings.prefix)   # read once: the loops below ask often

    for name in order:
        if not recipes[name].resolver:
            continue
        recorded = (stamps.get(name) or {}).get("inputs", {}).get("pins", {})
        if name not in active and recorded:
            # not rerun now: what it resolved to last time is what is installed, and
            # resolving again could need the network (version = "latest")
            for key, value in recorded.items():
                table, _, pin = key.partition(".")
                mine = pins.setdefault(name, {})
                # an unresolved intent ("latest", "auto", "" = derive) takes the recorded
                # value, so the receipt and a lock say what is installed
                if table == name and (pin not in mine or _unresolved(mine[pin])):
                    mine[pin] = value
        else:
            _resolve(recipes[name], pins, settings)
    pin_values = rcp.pin_vars(pins)

    items: dict[str, Item] = {}
    damaged: dict[str, str] = {}
    for name in order:
        recipe = recipes[name]
        stamp = stamps.get(name)
        not_needed = rcp.unmet(recipe.when, pin_values, str(recipe.path))
        dep_fps = {}
        for dep in recipe.depends:
            d = items[dep]
            if d.action == RUN or not (dstamp := stamps.get(dep)):
                dep_fps[dep] = d.fingerprint
            else:
                dep_fps[dep] = dstamp.get("fingerprint", "")
        variables = {**pin_values, **context_vars(settings, name)}
        variables["_version"] = rcp.interpolate(recipe.version, variables, str(recipe.path))
        # a patch whose header names the releases it is for is left out of the others
        patches, notes = for_version(_patch_files(recipe, settings), variables["_version"])
        if settings.target:
            patches, left_out = targetprofile.get(targetprofile.load_all(settings.recipes_dir),
                                                  settings.target).patches_for(name, patches)
            notes += left_out
        inputs = _inputs(recipe, pin_values, settings, tuple(patches), dep_fps)
        fp = _hash_json(inputs)
        claim = outputs.declared(recipe.outputs, variables, settings.prefix, str(recipe.path))
        item = Item(recipe, SKIP, "", fp, inputs, variables, tuple(patches), claim, notes)
        items[name] = item

        done = stamp is not None and stamp.get("status") == state.DONE
        # a stamp is a claim: what it says was made must still be there
        damage = outputs.problem(settings.prefix, outputs.merge(stamp.get("outputs"), claim)) if done else ""
        if damage:
            damaged[name] = damage
        rebuilt = next((d for d in recipe.depends if items[d].action == RUN
                        and outputs.contains(items[d].outputs, claim)), None) if done else None
        if not_needed:
            item.action, item.reason, item.fingerprint = SKIP, f"not needed: {not_needed}", ""
        elif name not in active:
            item.reason = "up to date" if done and stamp.get("fingerprint") == fp and not damage else (
                "skipped (--skip)" if name in settings.skip else
                "left out (--without)" if name in settings.without else "not selected")
            if damage:
                item.reason += f"; {damage}"
        elif stamp is None and settings.targets and name not in settings.targets:
            # `run X` reruns what X's change reaches; what was never installed waits for install
            item.reason = "not installed (install finishes it)"
        elif stamp is None:
            item.action, item.reason = RUN, "not installed"
        elif stamp.get("status") == state.FAILED:
            item.action, item.reason = RUN, "last run failed"
        elif stamp.get("status") != state.DONE:
            item.action, item.reason = RUN, "interrupted last time"
        elif settings.force and (not settings.targets or name in settings.targets):
            item.action, item.reason = RUN, "forced"
        elif damage:
            item.action, item.reason = RUN, damage
        elif rebuilt:
            item.action, item.reason = RUN, f"redone with {rebuilt}, whose tree holds its files"
        elif stamp.get("fingerprint") != fp:
            item.action, item.reason = RUN, explain_change(stamp.get("inputs") or {}, inputs)
        else:
            item.reason = "up to date"

    for item in items.values():
        if item.action != RUN:
            continue
        for dep in item.recipe.depends:
            d = items[dep]
            dstamp = stamps.get(dep)
            if d.action == SKIP and d.fingerprint and (dep in damaged or not (
                    dstamp and dstamp.get("status") == state.DONE)):
                why = damaged.get(dep) or f"which is not installed in {settings.prefix}"
                raise UsageError(f"{item.name} needs {dep}, {why}",
                                 hint=command(settings.prefix, "install"))
    return Plan(settings, [items[n] for n in order], pins)
