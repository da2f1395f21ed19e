"""The lock: intent (recipes/pins.toml) resolved into exact artifacts, as TOML.

A lock holds every pin after the resolvers ran (no "latest", no "auto") and, for
each artifact the plan would fetch, its URL, sha256 (where the upstream
publishes one or we recorded one), version, commit, and where each value came
from. `install --lock FILE` installs exactly its pins; the receipt embeds the
lock that was installed, so `lock --from-receipt PREFIX` gives the same stack
on a second machine. The format is in docs/design.md ("The lock").
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import InstallerError, UsageError

FORMAT = 1
UNRESOLVED = ("latest", "auto", "latest-for-rocm")
_PIN = re.compile(r"^\{([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)\}$")
# the torch stack's packages, as install-torch-stack names them
WHEELS = ("rocm", "torch", "torchvision", "torchaudio", "triton")


# --- artifacts of a plan ---------------------------------------------------------

def _origin(key: str, intent: dict[str, dict[str, Any]], resolver: str) -> str:
    """"pin" when the person chose the value, else which resolver derived it."""
    table, _, name = key.partition(".")
    given = str(intent.get(table, {}).get(name, "") or "")
    if given and given not in UNRESOLVED:
        return f"pin {key}"
    return f"derived {key}" + (f" ({resolver} resolver)" if resolver else "")


def _values(raw: dict[str, Any], item: Any, intent: dict, resolvers: dict[str, str]) -> dict[str, tuple[str, str]]:
    """field -> (interpolated value, origin) for the string fields of a step's `with`."""
    from . import recipes as rcp

    out = {}
    for field, value in raw.items():
        if not isinstance(value, str):
            continue
        got = rcp.interpolate(value, item.vars, str(item.recipe.path))
        m = _PIN.match(value)
        if m:
            table = m.group(1).split(".", 1)[0]
            origin = _origin(m.group(1), intent, resolvers.get(table, ""))
        else:
            origin = "recipe"
        out[field] = (got, origin)
    return out


def artifacts(plan: Any, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every file, wheel and git commit the plan's recipes fetch (all of them, or `names`).

    Read from the recipes' data: [source] tables and the steps that fetch
    (install-toolchain, install-torch-stack, fetch-sdist, fetch-git), with their
    `when` conditions, so a recipe added later is covered without code here.
    """
    from . import recipes as rcp

    intent = plan.settings.pins
    resolvers = {i.name: i.recipe.resolver for i in plan.items if i.recipe.resolver}
    wanted = set(names) if names is not None else None
    out: list[dict[str, Any]] = []
    for item in plan.items:
        if (wanted is not None and item.name not in wanted) or not in_stack(item, plan):
            continue
        where = str(item.recipe.path)
        source = item.recipe.source
        for step in item.recipe.steps:
            if rcp.unmet(step.when, item.vars, where):
                continue
            args = dict(step.args)
            if step.action == "fetch-git" and source is not None:   # the step's own values win
                args = {"url": source.url, "commit": source.commit, "tag": source.tag, **args}
            vals = _values(args, item, intent, resolvers)
            for art in _step_artifacts(item.name, step.action, vals):
                if art["kind"] == "wheel":   # the Python tag the wheels must fit
                    art["python"] = item.vars.get(f"{item.name}.python", "")
                out.append(art)
    return out


def in_stack(item: Any, plan: Any) -> bool:
    """Whether the item belongs to the stack the plan describes (not left out by --skip,
    --without or a `when` that does not hold)."""
    return not item.reason.startswith("not needed") and item.name not in plan.settings.skip


def _step_artifacts(recipe: str, action: str, vals: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    from .download import filename_of

    def v(field: str) -> str:
        return vals.get(field, ("", ""))[0]

    def origins(*fields: str) -> dict[str, str]:
        return {f: vals[f][1] for f in fields if f in vals and vals[f][0]}

    if action in ("install-toolchain", "fetch-sdist"):
        sha = v("sha256")
        art = {"recipe": recipe, "kind": "file", "name": filename_of(v("url")), "url": v("url"),
               "sha256": sha, "version": v("version"), "from": origins("url", "sha256", "version")}
        if not sha:
            art["from"]["sha256"] = "not published: recorded at the first download"
        return [art]
    if action == "fetch-git":
        return [{"recipe": recipe, "kind": "git", "name": v("url").rstrip("/").rsplit("/", 1)[-1],
                 "url": v("url"), "commit": v("commit"), "version": v("tag") or v("commit"),
                 "from": origins("url", "commit", "tag")}]
    if action == "install-torch-stack":
        index = v("index_url")
        return [{"recipe": recipe, "kind": "wheel", "name": pkg, "url": index, "version": v(pkg),
                 "from": origins(pkg, "index_url")} for pkg in WHEELS if v(pkg)]
    return []


# --- building, writing, reading ------------------------------------------------

def build(plan: Any) -> dict[str, Any]:
    """The lock of a resolved plan. Refuses a pin a resolver left unresolved."""
    from . import state

    pins = {t: {k: _plain(v) for k, v in sorted(vals.items())} for t, vals in sorted(plan.pins.items())}
    left = [f"{t}.{k}" for t, vals in pins.items() for k, v in vals.items() if v in UNRESOLVED]
    if left:
        raise InstallerError(f"not resolved: {', '.join(left)} (a lock never contains latest/auto)",
                             hint="give the recipe a resolver, or pin the values exactly")
    return {"lock_version": FORMAT, "created": state.now(), "archs": list(plan.settings.archs),
            "target": plan.settings.target, "pins": pins, "artifacts": artifacts(plan)}


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _toml_str(value: Any) -> str:
    # JSON string escapes are valid TOML basic-string escapes
    return json.dumps(str(value), ensure_ascii=False)


def dumps(lock: dict[str, Any]) -> str:
    lines = ["# rdna4-install lock: exact artifacts; install with `rdna4-install install --lock FILE`.",
             "# Generated by `rdna4-install lock`; edit recipes/pins.toml (intent) instead.",
             f"lock_version = {int(lock['lock_version'])}",
             f"created = {_toml_str(lock.get('created', ''))}",
             "archs = [" + ", ".join(_toml_str(a) for a in lock["archs"]) + "]",
             f"target = {_toml_str(lock.get('target', ''))}", ""]
    for table, vals in lock["pins"].items():
        lines.append(f"[pins.{_toml_str(table)}]")
        lines += [f"{_toml_str(k)} = {_toml_str(v)}" for k, v in vals.items()]
        lines.append("")
    for art in lock["artifacts"]:
        lines.append("[[artifacts]]")
        for k, v in art.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{_toml_str(a)} = {_toml_str(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {_toml_str(v)}")
        lines.append("")
    return "\n".join(lines)


def write(lock: dict[str, Any], path: Path) -> None:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(dumps(lock))
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"lock file not found: {path}", hint="write one with `rdna4-install lock -o FILE`") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}", hint="regenerate it with `rdna4-install lock -o FILE`") from None
    return check(data, str(path))


def check(data: Any, where: str) -> dict[str, Any]:
    hint = "regenerate it with `rdna4-install lock -o FILE`"
    if not isinstance(data, dict) or data.get("lock_version") != FORMAT:
        raise UsageError(f"{where}: not an rdna4-install lock (lock_version {FORMAT})", hint=hint)
    pins = data.get("pins")
    if not isinstance(pins, dict) or not all(isinstance(v, dict) for v in pins.values()):
        raise UsageError(f"{where}: no [pins.<recipe>] tables", hint=hint)
    for table, vals in pins.items():
        for key, value in vals.items():
            if not isinstance(value, str):
                raise UsageError(f"{where}: pins.{table}.{key} must be a string", hint=hint)
            if value in UNRESOLVED:
                raise UsageError(f"{where}: pins.{table}.{key} is {value!r}; a lock holds exact values",
                                 hint=hint)
    data.setdefault("archs", [])
    if not isinstance(data.setdefault("target", ""), str):
        raise UsageError(f"{where}: target must be a string (a target profile name)", hint=hint)
    data.setdefault("artifacts", [])
    return data


def from_receipt(prefix: Path) -> dict[str, Any]:
    """The lock embedded in PREFIX's receipt, with the hashes recorded at install filled in."""
    from . import state

    receipt = state.read_receipt(Path(prefix))
    if receipt is None:
        raise UsageError(f"no receipt in {prefix}", hint="install into it first, or check --from-receipt")
    if not isinstance(receipt.get("lock"), dict):
        raise UsageError(f"the receipt in {prefix} holds no lock (installed by an older version)",
                         hint=f"rerun `rdna4-install install --prefix {prefix}` to record one")
    lock = check(json.loads(json.dumps(receipt["lock"])), f"{prefix}/{state.RECEIPT}")
    components = receipt.get("components") or {}
    for art in lock["artifacts"]:
        facts = (components.get(art.get("recipe")) or {}).get("facts") or {}
        got = facts.get("sha256") or (facts.get("source") or {}).get("sha256", "")
        if art.get("kind") == "file" and not art.get("sha256") and got:
            art["sha256"] = got
            art.setdefault("from", {})["sha256"] = f"recorded by the install in {prefix}"
            # the pin that fed the URL gets the hash, so an install from this lock checks it
            table = art["recipe"]
            if table in lock["pins"] and "sha256" in lock["pins"][table]:
                lock["pins"][table]["sha256"] = got
    return lock


def settings_from(opts: dict[str, Any], sets: tuple[str, ...]) -> tuple[dict, dict[str, Any]]:
    """(pins, opts) for `install --lock FILE`: exactly the lock's pins and targets."""
    if sets or opts.get("pins_file"):
        options = [*(f"--set {shlex.quote(s)}" for s in sets),
                   *([f"--pins {shlex.quote(str(opts['pins_file']))}"] if opts.get("pins_file") else [])]
        raise UsageError("--lock installs exactly the lock's pins; --set, --pins, "
                         "--flash-attention-backend and --without flash-attention cannot change them",
                         hint=f"make a new lock with those options: rdna4-install lock {' '.join(options)} -o FILE")
    data = load(Path(opts["lock_file"]))
    archs = ",".join(data["archs"])
    given = opts.get("gpu_arch")
    if given and archs and sorted(given.split(",")) != sorted(data["archs"]):
        raise UsageError(f"--gpu-arch {given} differs from the lock's target {archs}",
                         hint="drop --gpu-arch, or make a lock for that target")
    if opts.get("target") and data["target"] and opts["target"] != data["target"]:
        raise UsageError(f"--target {opts['target']} differs from the lock's target {data['target']}",
                         hint=f"drop --target, or make a lock for it: rdna4-install lock --target "
                              f"{opts['target']} -o FILE")
    pins = {t: dict(v) for t, v in data["pins"].items()}
    return pins, {**opts, "gpu_arch": given or archs or None, "target": opts.get("target") or data["target"] or None}
