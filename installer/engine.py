"""Execute a plan: lock the prefix, run each recipe's steps, stamp what succeeded.

A recipe's stamp is first set to "incomplete" and becomes "done" with its
fingerprint only after every step and its check succeed, so an interrupted or
failed run is redone next time and a finished one is skipped.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__, actions, outputs, prefixes, proc, state
from . import recipes as rcp
from .errors import InstallerError, StepFailed
from .plan import RUN, Item, Plan, Settings, make_plan, selection
from .ui import UI


def tool_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "rdna4-install": __version__}
    for name, argv in (("uv", [proc.find_uv() or "uv", "--version"]), ("git", ["git", "--version"])):
        got = proc.capture(argv, env=proc.base_env(), timeout=20)
        out[name] = got.stdout.strip() if got.ok else "not found"
    return out


def _verb(settings: Settings) -> tuple[str, ...]:
    """`install --only ...` or `run NAMES ...`: the command a rerun hint repeats."""
    words = ["run", *settings.targets] if settings.targets else ["install"]
    for flag, names in (("--only", settings.only), ("--skip", settings.skip), ("--without", settings.without)):
        words += [w for n in names for w in (flag, n)]
    return tuple(words)


def _context(item: Item, settings: Settings, ui: UI, env: dict[str, str]) -> actions.StepContext:
    prefix = settings.prefix
    source = None
    if item.recipe.source is not None:
        src = item.recipe.source
        source = rcp.Source(**rcp.interpolate(dict(src.__dict__), item.vars, str(item.recipe.path)))
    return actions.StepContext(
        name=item.name, prefix=prefix, cache_dir=settings.cache_dir,
        work_dir=state.work_root(prefix) / item.name,
        log=state.logs_dir(prefix) / f"{item.name}.log",
        env=env, vars=item.vars, archs=settings.archs, jobs=settings.jobs or 0,
        offline=settings.offline, options=settings.options, ui=ui,
        source=source, patches=item.patches,
        force=settings.force and (not settings.targets or item.name in settings.targets),
        rerun_verb=_verb(settings),
        rerun_sets=settings.sets, rerun_pins=str(settings.pins_file or ""),
    )


def _run_step(ctx: actions.StepContext, step: rcp.Step, item: Item) -> None:
    where = f"{item.recipe.path} step {step.name!r}"
    if step.action:
        fn = actions.lookup(step.action, f"{item.recipe.path}: ")
        kwargs = rcp.interpolate(dict(step.args), item.vars, where)
        fn(ctx, **kwargs)
    else:
        argv = rcp.interpolate(list(step.run), item.vars, where)
        cwd = rcp.interpolate(step.cwd, item.vars, where) if step.cwd else None
        ctx.run(argv, cwd=cwd, what=f"{item.name}: {step.name}")


def run_recipe(item: Item, settings: Settings, ui: UI, index: int, total: int) -> None:
    prefix, name = settings.prefix, item.name
    ctx_env = proc.base_env(dict(rcp.interpolate(dict(item.recipe.env), item.vars, str(item.recipe.path))))
    ctx = _context(item, settings, ui, ctx_env)
    started = state.now()
    old = state.read_stamp(prefix, name) or {}
    state.write_stamp(prefix, name, {**old, "status": state.INCOMPLETE, "started": started})

    # a fresh work dir each attempt: a half-built tree from a killed run must not leak in
    if ctx.work_dir.exists():
        shutil.rmtree(ctx.work_dir)
    ctx.work_dir.mkdir(parents=True)
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    with open(ctx.log, "w", encoding="utf-8") as fh:
        fh.write(f"# rdna4-install {__version__}: {name} ({item.reason}) at {started}\n"
                 f"# fingerprint {item.fingerprint}\n")
        for key in sorted(ctx_env):
            fh.write(f"# env {key}={ctx_env[key]}\n")

    ui.step(f"[{index}/{total}] {name} {item.vars.get('_version', '')}".rstrip() + f"  ({item.reason})")
    steps = [s for s in item.recipe.steps]
    if item.recipe.check is not None:
        steps.append(item.recipe.check)
    ui.log = ctx.log  # retries and other notes of this recipe go into its log too
    try:
        for step in steps:
            why = rcp.unmet(step.when, item.vars, f"{item.recipe.path} step {step.name!r}")
            if why:
                ui.detail(f"{step.name}: not needed ({why})")
                continue
            ui.detail(step.name)
            _run_step(ctx, step, item)
    except (InstallerError, OSError) as exc:
        ui.to_log(f"error: {getattr(exc, 'message', None) or exc}")
        if getattr(exc, "hint", None):
            ui.to_log(f"hint: {exc.hint}")
        state.write_stamp(prefix, name, {
            **old, "status": state.FAILED, "started": started, "failed": state.now(),
            "attempted_fingerprint": item.fingerprint,
            "error": getattr(exc, "message", str(exc)),
        })
        tail = getattr(exc, "tail", None)
        if tail:
            ui.tail(tail, str(ctx.log))
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            raise InstallerError(f"{name}: {exc.strerror or exc}{where}",
                                 hint=f"work dir kept at {ctx.work_dir}; log: {ctx.log}") from None
        if not exc.hint:
            exc.hint = f"log: {ctx.log}; work dir kept at {ctx.work_dir}"
        if isinstance(exc, StepFailed) and (ctx.work_dir / actions.LAST_COMMAND).exists():
            exc.hint += f"; rerun the failed command with: sh '{ctx.work_dir / actions.LAST_COMMAND}'"
        exc.message = exc.message if exc.message.startswith(f"{name}: ") else f"{name}: {exc.message}"
        raise
    finally:
        ui.log = None
    state.write_stamp(prefix, name, {
        "status": state.DONE, "fingerprint": item.fingerprint, "inputs": item.inputs,
        "version": item.vars.get("_version", ""), "facts": ctx.facts,
        "source": item.inputs.get("source", {}), "patches": item.inputs.get("patches", {}),
        "env": item.inputs.get("env", {}), "outputs": item.outputs,
        "started": started, "finished": state.now(),
    })
    if not (item.recipe.keep_work or ctx.keep_work):
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
    ui.success(f"{name} done")


def install(settings: Settings, ui: UI, *, dry_run: bool = False,
            preflight: Callable[[list[Item]], None] | None = None) -> tuple[Plan, list[str]]:
    """Plan, then run what the plan says. Returns the plan and the recipes that ran.

    `preflight` sees the items about to run, under the lock and before any of them
    starts; it raises to stop the install (the CLI runs doctor's blocking checks there).
    """
    if dry_run:
        return make_plan(settings), []
    selection(settings)   # a bad or empty selection is refused before anything is written
    prefixes.check_prefix(settings.prefix, adopt=settings.adopt or settings.force)
    for path, what in ((settings.prefix, "prefix"), (settings.cache_dir, "cache")):
        problem = prefixes.write_problem(path, what)   # both judged before either is created
        if problem is not None:
            raise problem
    prefixes.check_writable(settings.prefix)
    prefixes.check_writable(settings.cache_dir, "cache")
    ran: list[str] = []
    with state.PrefixLock(settings.prefix):
        # an earlier run may have been SIGKILLed, which runs no cleanup: its temps go now
        from . import download, wheelcache

        state.sweep(settings.prefix)
        wheelcache.sweep(settings.cache_dir)
        download.sweep(settings.cache_dir)
        plan = make_plan(settings)
        todo = plan.to_run
        if todo:
            # every artifact exists upstream (or in the cache) before the first download
            from . import patches, pincheck

            pincheck.preflight(plan, [i.name for i in todo], ui)
            # and every patch against its sdist, before the hour of builds in front of it
            patches.precheck(todo, prefix=settings.prefix, cache_dir=settings.cache_dir,
                             offline=settings.offline, ui=ui)
            for item in todo:
                for note in item.notes:
                    ui.info(f"{item.name}: {note}")
        if todo and preflight is not None:
            preflight(todo)
        tools = tool_versions() if todo else {}
        try:
            for n, item in enumerate(todo, 1):
                run_recipe(item, settings, ui, n, len(todo))
                ran.append(item.name)
        finally:
            # no tools measured (nothing ran): write_receipt keeps the recorded ones
            state.write_receipt(settings.prefix, archs=settings.archs, pins=plan.pins, tools=tools,
                                installer_version=__version__,
                                visible_devices=str(settings.options.get("visible_devices", "")),
                                lock=_lock_of(plan), target=settings.target)
    return plan, ran


def _lock_of(plan: Plan) -> dict[str, Any] | None:
    """The lock the receipt embeds; None (keep the old one) when a pin is unresolved."""
    from . import lock

    try:
        return lock.build(plan)
    except InstallerError:
        return None


def status(prefix: Path, recipe_names: list[str]) -> list[dict[str, Any]]:
    """One row per recipe: done / failed / pending, with version, time and fingerprint."""
    stamps = state.all_stamps(prefix)
    rows = []
    for name in recipe_names + sorted(set(stamps) - set(recipe_names)):
        stamp = stamps.get(name) or {}
        facts = stamp.get("facts") or {}
        label = stamp.get("status", "pending")
        problem = outputs.problem(prefix, outputs.merge(stamp.get("outputs"))) if label == state.DONE else ""
        if label == state.INCOMPLETE:
            label = "pending (interrupted)"
        elif problem:
            label = "damaged"   # the next install redoes it
        rows.append({
            "recipe": name, "status": label,
            "version": str(stamp.get("version") or facts.get("version") or facts.get("commit") or ""),
            "when": stamp.get("finished") or stamp.get("failed") or stamp.get("started", ""),
            "fingerprint": stamp.get("fingerprint", ""), "problem": problem,
        })
        if label == state.FAILED:
            rows[-1].update(error=stamp.get("error", ""), log=str(state.logs_dir(prefix) / f"{name}.log"))
    return rows
