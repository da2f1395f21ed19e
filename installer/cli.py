"""The command line: parse, call the core, turn InstallerError into one line.

Logic lives in the stage modules; each command here only gathers options,
calls one core function and prints what it returns.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__, targetprofile
from .errors import EXIT_FAILURE, EXIT_USAGE, InstallerError, UsageError, command
from .ui import UI, record_commands, use_color



def _default_prefix() -> Path:
    return Path.home() / ".local" / "share" / "rdna4-install" / "default"


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdna4-install"


def _more(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    obj = ctx.find_object(Obj)
    if obj is not None and value:
        obj.ui.verbosity += value if _param.name == "verbose" else -value


class _Grammar:
    """What every command and group shares, so a command added later gets it too:
    -v/-q after the command name, and JSON on stdout for a failing --json run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.params += [  # type: ignore[attr-defined]
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_more,
                         help="More output; -vv shows tracebacks."),
            click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_more,
                         help="Only warnings and errors."),
        ]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes the list it is given
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except click.UsageError as exc:
            if "--json" in given:
                _json_error(exc.format_message(), None)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except InstallerError as exc:
            if ctx.params.get("as_json"):
                _json_error(exc.message, exc.hint)
            raise


def _json_error(message: str, hint: str | None) -> None:
    record_commands(message)
    record_commands(hint)
    click.echo(json.dumps({"error": message, "hint": hint}, indent=2))


class _Command(_Grammar, click.Command):
    pass


class _SubGroup(_Grammar, click.Group):
    command_class = _Command


class _Group(click.Group):
    """`rdna4-install --prefix DIR ...` with no command means `install ...`."""

    command_class = _Command
    group_class = _SubGroup

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((a for a in args if a not in ("-v", "-vv", "-vvv", "-q", "--verbose", "--quiet")), None)
        if first is not None and first.startswith("-") and first not in ("--help", "-h", "--version"):
            lead = [a for a in args[: args.index(first)]]
            args = lead + ["install"] + args[len(lead):]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InstallerError as exc:
            obj = ctx.find_object(Obj)
            if obj and obj.ui.verbosity >= 2:
                raise
            (obj.ui if obj else UI()).error(exc.message, exc.hint)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            UI().error("interrupted; nothing was marked done", "rerun the same command to resume")
            ctx.exit(130)


class Obj:
    def __init__(self, verbosity: int):
        self.ui = UI(verbosity)


pass_obj = click.make_pass_decorator(Obj)


# --- shared options ----------------------------------------------------------

def _path(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


prefix_opt = click.option("--prefix", type=click.Path(path_type=Path), envvar="RDNA4_PREFIX",
                          show_envvar=True, default=None,
                          help="Install into DIR [default: ~/.local/share/rdna4-install/default].")
cache_opt = click.option("--cache-dir", type=click.Path(path_type=Path), envvar="RDNA4_CACHE_DIR",
                         show_envvar=True, default=None,
                         help="Downloads, git mirrors and wheels shared by all prefixes "
                              "[default: $XDG_CACHE_HOME/rdna4-install].")
recipes_opt = click.option("--recipes-dir", type=click.Path(path_type=Path, file_okay=False),
                           envvar="RDNA4_RECIPES_DIR", show_envvar=True, default=None,
                           help="Use recipes from DIR (patches from DIR/../patches).")

mirror_opt = click.option("--mirror", type=click.Path(path_type=Path, dir_okay=False), envvar="RDNA4_MIRROR",
                          show_envvar=True, default=None,
                          help="A TOML file whose [rewrite] table maps upstream URL prefixes to a mirror "
                               "(https, loopback http or a local directory); longest prefix wins.")


def _use_mirror(opts: dict[str, Any]) -> None:
    from . import mirror

    mirror.use(mirror.load(_path(opts["mirror"])) if opts.get("mirror") else None)


def selection_options(fn):
    opts = [
        click.option("--target", envvar="RDNA4_TARGET", show_envvar=True, default=None, metavar="NAME",
                     help="Target profile: rdna4 (RX 9070/9060 series, R9700) or strix-halo (Ryzen AI "
                     "MAX, gfx1151) [default: from the detected GPUs; --gpu-arch implies it]."),
        click.option("--gpu-arch", envvar="RDNA4_GPU_ARCH", show_envvar=True, default=None,
                     metavar="ARCH[,ARCH]", help="Build for these arches instead of the detected GPUs "
                     "(gfx1200, gfx1201, gfx1151); needed on a host without the GPU."),
        click.option("--allow-unsupported-arch", is_flag=True,
                     help="Accept a --gpu-arch no target profile lists (untested; warns)."),
        click.option("--only", multiple=True, metavar="RECIPE", help="Run only these recipes."),
        click.option("--skip", multiple=True, metavar="RECIPE", help="Do not run these recipes."),
        click.option("--without", multiple=True, metavar="RECIPE",
                     help="Leave out an optional component, e.g. --without flash-attention."),
        click.option("--with", "with_", multiple=True, type=click.Choice(["ray"]), metavar="COMPONENT",
                     help="Add an optional component: ray (vLLM across machines, see `cluster`); "
                          "reruns keep it."),
        click.option("--jobs", "-j", type=click.IntRange(min=1), envvar="RDNA4_JOBS", show_envvar=True,
                     default=None, help="Parallel compile jobs [default: from free memory and cores]."),
        click.option("--set", "sets", multiple=True, metavar="RECIPE.KEY=VALUE",
                     help="Override one pin, e.g. --set vllm.version=0.33.0."),
        click.option("--pins", "pins_file", type=click.Path(path_type=Path, dir_okay=False),
                     envvar="RDNA4_PINS", show_envvar=True, default=None,
                     help="A TOML file of pins overriding recipes/pins.toml."),
        click.option("--flash-attention-backend", type=click.Choice(["ck", "triton"]), default=None,
                     help="ck builds the CK kernels; triton skips that build and uses the Triton kernels."),
        click.option("--editable", is_flag=True, help="Install vLLM editable from its work tree."),
        click.option("--offline", is_flag=True, envvar="RDNA4_OFFLINE", show_envvar=True,
                     help="Use only the download cache; fail on a miss."),
        mirror_opt, recipes_opt, cache_opt, prefix_opt,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _target_archs(opts: dict[str, Any], ui: UI, prefix: Path, receipt: dict[str, Any], *, need: bool,
                  detection: Any = None, profiles: Any = None) -> tuple[str, ...]:
    """--gpu-arch, else --target's or the detected profile's arches, else (for reruns) what the
    prefix was built for."""
    from . import detect

    gpu_arch, target = opts.get("gpu_arch"), opts.get("target")
    receipt_archs = tuple(receipt.get("archs") or ())
    if not gpu_arch and not target and not need and receipt_archs:
        return receipt_archs
    if detection is None:
        # with --gpu-arch nothing needs the hardware, so don't wait for rocminfo
        detection = (detect.Detection([], (), "") if gpu_arch
                     else detect.detect(prefix=prefix, profiles=profiles))
    try:
        archs = detect.choose_target(detection, gpu_arch, opts.get("allow_unsupported_arch", False),
                                     target=target, profiles=profiles)
    except UsageError:
        if gpu_arch or target or not receipt_archs:
            raise  # the --gpu-arch advice, before any warning about the host
        archs = receipt_archs  # a build host: keep building for what this prefix targets
    for warning in detection.warnings:
        ui.warn(warning)
    return archs


def _settings(opts: dict[str, Any], ui: UI, *, targets: tuple[str, ...] = (), force: bool = False,
              need_gpu: bool = True, detection: Any = None, adopt: bool = False):
    from . import buildenv, multigpu, state
    from . import recipes as rcp
    from .plan import Settings

    _use_mirror(opts)
    prefix = _path(opts.get("prefix") or _default_prefix())
    # what the last install here recorded: the target and GPU visibility of a rerun
    receipt = state.read_receipt(prefix) or {}
    cache = _path(opts.get("cache_dir") or _default_cache())
    recipes_dir = _path(opts["recipes_dir"]) if opts.get("recipes_dir") else rcp.default_recipes_dir()
    sets = tuple(opts.get("sets") or ())
    if opts.get("flash_attention_backend"):
        sets += (f"flash-attention.backend={opts['flash_attention_backend']}",)
    without = tuple(opts.get("without") or ())
    if "flash-attention" in without:
        # a pin, not a skip: the activation script must also stop selecting a backend
        sets += ("flash-attention.backend=none",)
        without = tuple(w for w in without if w != "flash-attention")
    if opts.get("lock_file"):
        if "ray" in (opts.get("with_") or ()):
            raise UsageError("--lock installs exactly the lock's stack; --with ray cannot add to it",
                             hint="make the lock with Ray: rdna4-install lock --with ray -o FILE")
    elif "ray" in (opts.get("with_") or ()) or _kept(receipt, "ray.enabled", sets):
        sets += ("ray.enabled=true",)
    origins: dict[str, str] = {}
    if opts.get("lock_file"):
        from . import lock

        pins, opts = lock.settings_from(opts, sets)
    profiles = targetprofile.load_all(recipes_dir)
    archs = _target_archs(opts, ui, prefix, receipt, need=need_gpu, detection=detection,
                          profiles=profiles)
    profile = targetprofile.of_archs(profiles, archs)
    _one_target(prefix, receipt, profile, profiles)
    if not opts.get("lock_file"):
        pins = targetprofile.pin_defaults(profile, rcp.load_pins(recipes_dir / rcp.PINS_FILE), origins)
        pins = rcp.apply_overrides(pins, pins_file=opts.get("pins_file"), sets=sets, origins=origins)
    jobs, too_many = buildenv.capped_jobs(opts.get("jobs"))
    if too_many:
        ui.warn(too_many)
    # how many target GPUs and their P2P: detected now, else what the last install recorded
    gpus = multigpu.facts(detection) if detection is not None else multigpu.recorded(receipt)
    return Settings(
        prefix=prefix, cache_dir=cache, recipes_dir=recipes_dir, archs=archs, pins=pins,
        jobs=jobs, only=tuple(opts.get("only") or ()),
        skip=tuple(opts.get("skip") or ()), without=without,
        targets=targets, force=force, adopt=adopt, offline=bool(opts.get("offline")), pin_origins=origins,
        sets=sets, pins_file=opts.get("pins_file"),
        target=profile.name if profile else "",
        options={"editable": bool(opts.get("editable")),
                 "visible_devices": detection.visible_devices if detection is not None
                 else str(receipt.get("visible_devices", "")), **gpus},
    )


def _one_target(prefix: Path, receipt: dict[str, Any], profile: Any, profiles: Any) -> None:
    """One prefix holds one target profile: a rerun that chose another is refused."""
    had = str(receipt.get("target") or "") or getattr(targetprofile.of_receipt(receipt, profiles=profiles), "name", "")
    if had and profile is not None and profile.name != had:
        raise UsageError(f"{prefix} holds target {had}; this run chose {profile.name} "
                         "(one prefix holds one target)",
                         hint=f"rdna4-install install --prefix '{prefix}' --target {had} "
                              f"(or install {profile.name} into another --prefix)")


def _kept(receipt: dict[str, Any], pin: str, sets: tuple[str, ...]) -> bool:
    """A `--with` choice the last install recorded as "true", unless --set names it now."""
    table, _, key = pin.partition(".")
    recorded = str(((receipt.get("pins") or {}).get(table) or {}).get(key, "")).lower() == "true"
    return recorded and not any(s.startswith(pin + "=") for s in sets)
def _bundle_opts(opts: dict[str, Any], source: str, prefix: Path, detection: Any,
                 ui: UI) -> tuple[dict[str, Any], Path]:
    """Unpack and verify a bundle; the install then runs on its recipes and pins only."""
    from . import bundle

    clash = [flag for flag, key in (("--set", "sets"), ("--pins", "pins_file"), ("--mirror", "mirror"),
                                    ("--recipes-dir", "recipes_dir"), ("--editable", "editable"),
                                    ("--without", "without"),
                                    ("--flash-attention-backend", "flash_attention_backend"))
             if opts.get(key)]
    if clash:
        raise UsageError(f"--from-bundle installs exactly what the bundle holds; drop {', '.join(clash)}",
                         hint="change the source prefix and bundle it again instead")
    archs = _target_archs(opts, ui, prefix, {}, need=True, detection=detection)
    cache = _path(opts.get("cache_dir") or _default_cache())
    staged = bundle.unpack(source, cache_dir=cache, prefix=prefix, archs=archs, ui=ui)
    return {**opts, "recipes_dir": staged / "recipes", "mirror": None, "offline": False}, staged


def _preflight(settings, detection: Any, ui: UI, archs_given: bool, todo: list) -> None:
    """Doctor's blocking checks, for the recipes about to run (engine.install calls it)."""
    from . import buildenv, doctor

    need = int(sum(i.recipe.disk_gb for i in todo) * 1024 ** 3)
    jobs = buildenv.max_jobs("vllm", override=settings.jobs)
    checks = doctor.run_checks(prefix=settings.prefix, cache_dir=settings.cache_dir, need_bytes=need,
                               jobs=jobs, archs_given=archs_given, blocking_only=True,
                               detection=detection)
    for check in checks:
        if check.status == "warn":
            ui.warn(f"{check.name}: {check.detail}")
    failures = doctor.blocking_failures(checks)
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more; see `rdna4-install doctor`)" if len(failures) > 1 else ""
        raise InstallerError(f"{first.name}: {first.detail}{more}",
                             hint=first.fix or "run `rdna4-install doctor` for details")


def _short(version: str) -> str:
    """A commit SHA as version reads better in a table as its first 12 digits."""
    return version[:12] if len(version) == 40 and all(c in "0123456789abcdef" for c in version) else version


def _print_plan(plan, ui: UI, verbose: bool) -> None:
    from . import mirror

    width = max((len(i.name) for i in plan.items), default=0)
    s = plan.settings
    click.echo(f"plan for {s.prefix} (target: {s.target + ' ' if s.target else ''}{','.join(s.archs)})")
    for item in plan.items:
        mark = "will run" if item.action == "run" else "skip    "
        version = _short(item.vars.get("_version", ""))
        click.echo(f"  {mark}  {item.name:<{width}}  {version:<20}  {item.reason}")
        for note in item.notes:
            click.echo(f"      note: {note}")
        if verbose:
            for key, value in item.inputs.get("pins", {}).items():
                table, _, name = key.partition(".")
                declared = plan.settings.pins.get(table, {})
                # a resolver's output is shown but cannot be --set; an empty pin it filled in can
                note = (" (derived)" if name not in declared else
                        " (default)" if declared[name] == "" and value != "" else "")
                click.echo(f"      pin {key} = {mirror.shown(value) if value != '' else '(empty)'}{note}")
            for key, value in item.inputs.get("source", {}).items():
                click.echo(f"      source {key} = {mirror.shown(value)}")
            for key, value in item.inputs.get("patches", {}).items():
                click.echo(f"      patch {key} sha256:{value[:16]}")
            if item.fingerprint:
                click.echo(f"      fingerprint {item.fingerprint[:16]}")


# --- commands ------------------------------------------------------------------

def examples(*commands: str) -> str:
    """An --help epilog: 'Examples:' and one command per paragraph (kept short: click rewraps)."""
    return "Examples:\n\n" + "\n\n".join(f"  {c}" for c in commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples("rdna4-install install --prefix ~/rdna4",
                             "rdna4-install plan --prefix ~/rdna4 --gpu-arch gfx1201 -v",
                             "rdna4-install status --prefix ~/rdna4"))
@click.version_option(__version__, prog_name="rdna4-install")
@click.option("-v", "--verbose", count=True, help="More output; -vv shows tracebacks.")
@click.option("-q", "--quiet", count=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Build and install vLLM for AMD RDNA4 GPUs (gfx1200/gfx1201) without Docker or root.

    `rdna4-install --prefix DIR [options]` is short for `rdna4-install install --prefix DIR [options]`.
    """
    ctx.obj = Obj(verbose - quiet)


@cli.command(epilog=examples("rdna4-install install --prefix ~/rdna4 --with ray",
                             "rdna4-install install --lock stack.lock --prefix ~/rdna4",
                             "rdna4-install install --from-bundle rdna4.bundle --prefix ~/rdna4"))
@selection_options
@click.option("--lock", "lock_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE", help="Install exactly the stack in FILE (from `rdna4-install lock`).")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--no-checks", is_flag=True, envvar="RDNA4_NO_CHECKS", show_envvar=True,
              help="Skip doctor's blocking host checks (disk, tools, GPU access) before installing.")
@click.option("--force", is_flag=True,
              help="Install into a non-empty folder that rdna4-install did not create.")
@click.option("--from-bundle", "from_bundle", metavar="FILE", default=None,
              help="Install offline from a bundle made by `rdna4-install bundle` (- reads stdin).")
@pass_obj
def install(obj: Obj, dry_run: bool, no_checks: bool, force: bool, from_bundle: str | None,
            **opts: Any) -> None:
    """Install (or update) the whole stack into a prefix."""
    from . import detect, engine

    prefix = _path(opts.get("prefix") or _default_prefix())
    detection = detect.detect(prefix=prefix)
    staged = None
    if from_bundle is not None:
        opts, staged = _bundle_opts(opts, from_bundle, prefix, detection, obj.ui)
    settings = _settings(opts, obj.ui, detection=detection, adopt=force)  # also shows detection's warnings
    preflight = None if no_checks else functools.partial(
        _preflight, settings, detection, obj.ui, bool(opts.get("gpu_arch")))
    if staged is None:
        plan, ran = engine.install(settings, obj.ui, dry_run=dry_run, preflight=preflight)
    else:
        from . import bundle

        with bundle.installing(staged, settings.cache_dir):
            plan, ran = engine.install(settings, obj.ui, dry_run=dry_run, preflight=preflight)
    if dry_run:
        _print_plan(plan, obj.ui, obj.ui.verbosity >= 1)
        return
    if not ran:
        obj.ui.success(f"everything in {settings.prefix} is up to date")
    elif (settings.prefix / "activate").is_file():
        obj.ui.success(f"installed into {settings.prefix}; activate with: . '{settings.prefix}/activate'")
    else:  # e.g. --only therock: no activation script was written
        obj.ui.success(f"installed {', '.join(ran)} into {settings.prefix}")


@cli.command(epilog=examples("rdna4-install plan --prefix ~/rdna4 -v",
                             "rdna4-install plan --gpu-arch gfx1201 --set vllm.version=0.33.0",
                             "rdna4-install plan --prefix ~/rdna4 --json"))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@pass_obj
def plan(obj: Obj, as_json: bool, **opts: Any) -> None:
    """Show the ordered steps, which will run and why (-v: every pin, source and patch)."""
    from .plan import make_plan

    result = make_plan(_settings(opts, obj.ui, need_gpu=False))
    if as_json:
        click.echo(json.dumps(result.to_json(verbose=True), indent=2))
    else:
        _print_plan(result, obj.ui, obj.ui.verbosity >= 1)


@cli.command("lock", epilog=examples("rdna4-install lock --gpu-arch gfx1201 -o stack.lock",
                                     "rdna4-install lock --set vllm.version=latest -o stack.lock",
                                     "rdna4-install lock --from-receipt ~/rdna4 -o stack.lock"))
@selection_options
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE", help="Write the lock to FILE [default: print it].")
@click.option("--from-receipt", type=click.Path(path_type=Path, file_okay=False), default=None,
              metavar="PREFIX", help="The lock of what is installed in PREFIX (same stack elsewhere).")
@pass_obj
def lock_cmd(obj: Obj, output: Path | None, from_receipt: Path | None, **opts: Any) -> None:
    """Resolve the pins into exact artifacts (URL, sha256, version, commit) and write a lock."""
    from . import lock
    from .plan import make_plan

    if from_receipt is not None:
        data = lock.from_receipt(_path(from_receipt))
    else:
        data = lock.build(make_plan(_settings(opts, obj.ui, need_gpu=False)))
    if output is None:
        click.echo(lock.dumps(data))
        return
    lock.write(data, _path(output))
    obj.ui.success(f"wrote {output} ({len(data['artifacts'])} artifacts); "
                   f"install it with: rdna4-install install --lock {output}")


@cli.group(epilog=examples("rdna4-install pins check", "rdna4-install pins update",
                           "rdna4-install pins update --write my-pins.toml"))
def pins() -> None:
    """Check the pins against the live upstreams, or propose the newest coherent stack."""


@pins.command("check", epilog=examples("rdna4-install pins check --gpu-arch gfx1201",
                                       "rdna4-install pins check --json",
                                       "rdna4-install pins check --set vllm.version=latest"))
@selection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def pins_check(obj: Obj, as_json: bool, **opts: Any) -> None:
    """Ask each upstream whether every artifact of the plan exists (exit 1 if one is missing)."""
    from . import pincheck

    report = pincheck.check_settings(_settings(opts, obj.ui, need_gpu=False))
    click.echo(pincheck.to_json(report) if as_json else pincheck.format_table(report))
    if not report.ok:
        raise click.exceptions.Exit(1)


@pins.command("update", epilog=examples("rdna4-install pins update",
                                        "rdna4-install pins update --write recipes/pins.toml",
                                        "rdna4-install pins update --set therock.channel=nightly"))
@selection_options
@click.option("--write", "write_to", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE", help="Write the proposed pins to FILE (a --pins file) instead of only printing.")
@pass_obj
def pins_update(obj: Obj, write_to: Path | None, **opts: Any) -> None:
    """Propose the newest coherent stack and show how it differs from the current pins."""
    from . import pinupdate

    settings = _settings(opts, obj.ui, need_gpu=False)
    proposal = pinupdate.propose(settings, ui=obj.ui)
    click.echo(pinupdate.format_diff(proposal))
    if write_to is not None:
        pinupdate.write(proposal, _path(write_to))
        obj.ui.success(f"wrote {write_to}; use it with --pins {write_to}")


@cli.command(epilog=examples("rdna4-install run vllm --prefix ~/rdna4 --set vllm.version=latest",
                             "rdna4-install run flash-attention --force --dry-run --prefix ~/rdna4",
                             "rdna4-install run therock --force --only therock --prefix ~/rdna4"))
@click.argument("recipes", nargs=-1, required=True)
@click.option("--force", is_flag=True,
              help="Redo the named recipes even when nothing changed; also accept a download whose "
                   "sha256 differs from the one this prefix recorded, replace what the installer "
                   "did not make (a file in PREFIX/rocm-<version>, a PREFIX/rocm link elsewhere) "
                   "and accept a non-empty prefix that rdna4-install did not create.")
@selection_options
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@pass_obj
def run(obj: Obj, recipes: tuple[str, ...], force: bool, dry_run: bool, **opts: Any) -> None:
    """Rerun RECIPES, then whatever depends on them if its inputs changed (or its files
    are gone); --only/--skip narrow that set."""
    from . import engine

    settings = _settings(opts, obj.ui, targets=recipes, force=force, need_gpu=False)
    result, ran = engine.install(settings, obj.ui, dry_run=dry_run)
    if dry_run:
        _print_plan(result, obj.ui, obj.ui.verbosity >= 1)
    elif not ran:
        obj.ui.success(f"{', '.join(recipes)}: up to date (use --force to redo)")


@cli.command(epilog=examples("rdna4-install bundle --prefix ~/rdna4 -o rdna4-gfx1201.bundle",
                             "rdna4-install bundle --prefix ~/rdna4 -o -   # to stdout, e.g. into ssh"))
@prefix_opt
@cache_opt
@recipes_opt
@mirror_opt
@click.option("-o", "--output", required=True, metavar="FILE", help="Write the bundle here (- for stdout).")
@pass_obj
def bundle(obj: Obj, prefix: Path | None, cache_dir: Path | None, recipes_dir: Path | None,
           mirror: Path | None, output: str) -> None:
    """Pack an installed prefix into one file that installs elsewhere with no network and no compiler."""
    import time

    from . import bundle as bdl
    from . import recipes as rcp

    _use_mirror({"mirror": mirror})
    started = time.monotonic()
    manifest = bdl.create(_path(prefix or _default_prefix()), cache_dir=_path(cache_dir or _default_cache()),
                          recipes_dir=_path(recipes_dir) if recipes_dir else rcp.default_recipes_dir(),
                          out=output if output == "-" else str(_path(output)), ui=obj.ui)
    obj.ui.success(bdl.describe(manifest, output if output == "-" else str(_path(output)),
                                time.monotonic() - started))


@cli.group("mirror", epilog=examples("rdna4-install mirror create /mnt/usb/rdna4-mirror --gpu-arch gfx1201",
                                     "rdna4-install mirror create ./mirror --gpu-arch gfx1200,gfx1201"))
def mirror_group() -> None:
    """Mirrors of everything an install downloads (see --mirror)."""


@mirror_group.command("create", epilog=examples(
    "rdna4-install mirror create /mnt/usb/rdna4-mirror --gpu-arch gfx1201",
    "rdna4-install mirror create /mnt/usb/rdna4-mirror --lock stack.lock",
    "rdna4-install mirror create ./mirror --gpu-arch gfx1200,gfx1201"))
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@selection_options
@click.option("--lock", "lock_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE", help="Mirror exactly the stack in FILE (from `rdna4-install lock`).")
@pass_obj
def mirror_create(obj: Obj, dest: Path, **opts: Any) -> None:
    """Download every artifact of the plan (or of a lock) into DEST and write DEST/mirror.toml."""
    from . import mirrorlayout
    from .plan import make_plan

    plan = make_plan(_settings(opts, obj.ui, need_gpu=False))
    path = mirrorlayout.create(plan, _path(dest), obj.ui)
    obj.ui.success(f"mirror in {_path(dest)}; install from it with --mirror '{path}'")


@cli.command("detect", epilog=examples("rdna4-install detect", "rdna4-install detect --json"))
@prefix_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def detect_cmd(obj: Obj, prefix: Path | None, as_json: bool) -> None:
    """List AMD GPUs, where each was found, and the build target."""
    from . import detect

    found = detect.detect(prefix=_path(prefix or _default_prefix()))
    if as_json:
        click.echo(json.dumps(found.to_json(), indent=2))
        return
    click.echo(detect.format_table(found))
    for warning in found.warnings:
        obj.ui.warn(warning)


@cli.command(epilog=examples("rdna4-install tune --model Qwen/Qwen3-8B-FP8",
                             "rdna4-install tune --model ~/models/Qwen3-14B-FP8 --tp 2",
                             "rdna4-install tune --restore"))
@prefix_opt
@cache_opt
@click.option("--model", default=None, help="A block-FP8 model: a local folder or a cached hub name.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel size the model will be served with (it splits the GEMM shapes).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Tune one batch size only [default: the tuner's 1..4096 list].")
@click.option("--restore", is_flag=True, help="Copy the recorded configs back into vLLM (after a rebuild); no tuning.")
@pass_obj
def tune(obj: Obj, prefix: Path | None, cache_dir: Path | None, model: str | None, tp: int,
         batch_size: int | None, restore: bool) -> None:
    """Tune vLLM's FP8 GEMM for a model's shapes on this card and install the configs."""
    from . import tune as tn

    where = _path(prefix or _default_prefix())
    if restore:
        restored = tn.restore(where)
        obj.ui.success(f"restored {len(restored)} tuned config(s)" if restored else "every tuned config is in place")
        return
    if not model:
        raise UsageError("tune needs --model (or --restore)",
                         hint=command(where, "tune", "--model", "MODEL") + " (MODEL: a block-FP8 checkpoint "
                              "such as Qwen/Qwen3-8B-FP8)")
    result = tn.run(where, model, cache_dir=_path(cache_dir or _default_cache()),
                    tp=tp, batch_size=batch_size, ui=obj.ui)
    click.echo(tn.format_result(result))


@cli.command(epilog=examples("rdna4-install report",
                             "rdna4-install report --model Qwen/Qwen3-0.6B --bench",
                             "rdna4-install report -o ~/rdna4-report.md"))
@prefix_opt
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Report file [default: ./rdna4-report-<date>.md].")
@click.option("--model", default=None, help="Model for verify --deep's generation [default: a small cached one].")
@click.option("--tune-model", default=None, help="Also run `tune` for this block-FP8 model (long).")
@click.option("--bench", "with_bench", is_flag=True, help="Also run `bench --profile seed --profile rdna4-16g` (long).")
@pass_obj
def report(obj: Obj, prefix: Path | None, output: Path | None, model: str | None, tune_model: str | None,
           with_bench: bool) -> None:
    """First run on a real card: doctor, verify --deep, tune, bench into one file for an issue."""
    from . import report as rp

    out = _path(output or f"rdna4-report-{time.strftime('%Y%m%d-%H%M%S')}.md")
    path, codes = rp.run(_path(prefix or _default_prefix()), out, model=model, tune_model=tune_model,
                         bench=with_bench, ui=obj.ui)
    for title, code in codes.items():
        click.echo(f"{title}: {'ok' if code == 0 else f'exit code {code}'}")
    obj.ui.success(f"report written to {path}; attach it to an issue")


@cli.command(epilog=examples("rdna4-install doctor", "rdna4-install doctor --gpu-arch gfx1201 --jobs 8",
                             "rdna4-install doctor --target strix-halo --json"))
@prefix_opt
@cache_opt
@recipes_opt
@click.option("--target", envvar="RDNA4_TARGET", show_envvar=True, default=None, metavar="NAME",
              help="Check for this target profile (strix-halo adds the unified-memory check) "
                   "[default: from the detected GPUs; --gpu-arch implies it].")
@click.option("--gpu-arch", envvar="RDNA4_GPU_ARCH", show_envvar=True, default=None, metavar="ARCH[,ARCH]",
              help="Building for a GPU elsewhere: GPU checks warn instead of failing.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), envvar="RDNA4_JOBS", show_envvar=True, default=None,
              help="Parallel compile jobs to check memory for.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def doctor(obj: Obj, prefix: Path | None, cache_dir: Path | None, recipes_dir: Path | None,
           target: str | None, gpu_arch: str | None, jobs: int | None, as_json: bool) -> None:
    """Check the host: driver, device access, groups, disk, memory, tools (and an APU's GPU memory)."""
    from . import buildenv, engine, state
    from . import doctor as doc
    from . import recipes as rcp

    prefix = _path(prefix or _default_prefix())
    cache = _path(cache_dir or _default_cache())
    folder = _path(recipes_dir) if recipes_dir else rcp.default_recipes_dir()
    # what a full install still needs: every recipe the next install would (re)do,
    # i.e. not done or damaged (the same judgement as `status`)
    recipes = rcp.load_recipes(folder)
    need = sum(recipes[row["recipe"]].disk_gb for row in engine.status(prefix, list(recipes))
               if row["status"] != state.DONE and row["recipe"] in recipes)
    checks = doc.run_checks(prefix=prefix, cache_dir=cache, need_bytes=int(need * 1024 ** 3),
                            jobs=buildenv.max_jobs("vllm", override=jobs), archs_given=bool(gpu_arch),
                            target=target, gpu_arch=gpu_arch, recipes_dir=folder)
    capped, too_many = buildenv.capped_jobs(jobs)
    if too_many:   # builds use the capped number; say so where the host is judged
        checks.append(doc.Check("jobs", doc.WARN, too_many, f"use --jobs {capped} or fewer"))
    failed = doc.failed(checks)
    for check in checks:
        record_commands(check.fix)
    if as_json:
        out: dict[str, Any] = {"checks": [c.to_json() for c in checks]}
        if failed:
            out["error"] = f"{sum(c.status == doc.FAIL for c in checks)} checks failed"
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(doc.format_checks(checks, color=use_color(sys.stdout)))
    if failed:
        raise click.exceptions.Exit(1)


@cli.command(epilog=examples("rdna4-install verify --prefix ~/rdna4",
                             "rdna4-install verify --deep --model Qwen/Qwen3-0.6B --json",
                             "rdna4-install verify --deep --model ~/models/opt-125m --timeout 1800"))
@prefix_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--timeout", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds the probes may take in all.")
@click.option("--deep", is_flag=True, help="Also run the minutes-long kernel probes on the card "
              "(LLMM1, FP8 kernel choice and GEMM, CK varlen fwd/bwd, an offline generation).")
@click.option("--model", default=None, help="Model for --deep's generation [default: a small cached one].")
@click.option("--allow-download", is_flag=True, help="Let --deep download --model if it is not cached.")
@pass_obj
def verify(obj: Obj, prefix: Path | None, as_json: bool, timeout: float, deep: bool, model: str | None,
           allow_download: bool) -> None:
    """Prove the install on the card: torch on HIP, native FP8, CK flash-attention, code objects."""
    from . import verify as ver

    probes = ver.run(_path(prefix or _default_prefix()), timeout=timeout, deep=deep, model=model,
                     allow_download=allow_download)
    click.echo(ver.to_json(probes) if as_json else ver.format_table(probes))
    if ver.failed(probes):
        raise click.exceptions.Exit(1)


@cli.command(epilog=examples("rdna4-install bench --profile seed --profile rdna4-16g",
                             "rdna4-install bench --prefix ~/strix --profile strix-halo",
                             "rdna4-install bench --baseline before.json"))
@prefix_opt
@click.option("--model", default=None, help="Model to serve [default: the target profile's bench model: "
              "the reference FP8 Llama-3.1-8B on rdna4, a BF16 one on strix-halo].")
@click.option("--request-rate", type=float, default=None, help="Requests per second [default: 10].")
@click.option("--num-prompts", type=int, default=None, help="Prompts to send [default: 1000].")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Server port [default: a free one].")
@click.option("--ready-timeout", type=float, default=None, help="Seconds to wait for the server [default: 1800].")
@click.option("--serve-arg", "serve_args", multiple=True, metavar="ARG", help="Extra `vllm serve` argument.")
@click.option("--bench-arg", "bench_args", multiple=True, metavar="ARG",
              help="Extra `vllm bench serve` argument.")
@click.option("--profile", "profile_names", multiple=True,
              type=click.Choice(["seed", "rdna4-16g", "strix-halo"]),
              help="Server settings to run, side by side (repeatable): seed = the reference's, "
                   "rdna4-16g = FP8 KV cache, KV offloading to RAM, batch sized from free VRAM "
                   "(FP8 targets), strix-halo = a large 16-bit KV cache in unified memory.")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An earlier result file (PREFIX/bench/*.json) to show beside this run, e.g. before `tune`.")
@pass_obj
def bench(obj: Obj, prefix: Path | None, model: str | None, request_rate: float | None,
          num_prompts: int | None, port: int | None, ready_timeout: float | None,
          serve_args: tuple[str, ...], bench_args: tuple[str, ...], profile_names: tuple[str, ...],
          baseline: Path | None) -> None:
    """Serve the target's bench model and measure throughput beside the reference figures."""
    from . import bench as bn

    kwargs: dict[str, Any] = {k: v for k, v in (("model", model), ("request_rate", request_rate),
                                                ("num_prompts", num_prompts), ("port", port),
                                                ("ready_timeout", ready_timeout)) if v is not None}
    prefix = _path(prefix or _default_prefix())
    runs = [bn.load_result(baseline)] if baseline else []
    runs += bn.run_profiles(prefix, profile_names, extra_serve_args=list(serve_args),
                            extra_bench_args=list(bench_args), ui=obj.ui, echo=click.echo, **kwargs)
    click.echo(bn.format_comparison(*runs))


@cli.command(context_settings={"ignore_unknown_options": True}, epilog=examples(
    "rdna4-install cluster head --prefix ~/rdna4",
    "rdna4-install cluster join 192.168.1.10:6379 --prefix ~/rdna4",
    "rdna4-install cluster status --prefix ~/rdna4"))
@click.argument("verb", type=click.Choice(["head", "join", "status", "stop"]))
@click.argument("address", required=False)
@click.argument("ray_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--all", "stop_all", is_flag=True,
              help="stop: also stop Ray nodes of other installs (`ray stop` stops them all).")
@prefix_opt
@pass_obj
def cluster(obj: Obj, verb: str, address: str | None, ray_args: tuple[str, ...], stop_all: bool,
            prefix: Path | None) -> None:
    """Ray across machines: head | join ADDRESS | status | stop, run from the prefix's venv.

    Thin wrappers over `ray start --head`, `ray start --address ADDRESS`, `ray status` and
    `ray stop` with the activation's environment (install Ray with `--with ray`). Arguments
    after the verb go to `ray` unchanged, e.g. `cluster head --port 6380 --num-cpus 8`.
    """
    from . import cluster as cl

    if verb != "join" and address is not None:
        ray_args, address = (address, *ray_args), None   # `head --port 6380`: not an ADDRESS
    cl.run(_path(prefix or _default_prefix()), verb, address=address, ray_args=ray_args,
           stop_all=stop_all, on_line=click.echo)


@cli.command(epilog=examples("rdna4-install status --prefix ~/rdna4",
                             "rdna4-install status --prefix ~/rdna4 --json"))
@prefix_opt
@recipes_opt
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_obj
def status(obj: Obj, prefix: Path | None, recipes_dir: Path | None, as_json: bool) -> None:
    """Show each recipe: done / failed / pending, version, when, fingerprint."""
    from . import engine
    from . import recipes as rcp

    prefix = _path(prefix or _default_prefix())
    folder = _path(recipes_dir) if recipes_dir else rcp.default_recipes_dir()
    from . import state
    from .plan import dependency_order, switched_off

    if not prefix.is_dir():
        raise InstallerError(f"nothing is installed in {prefix} (no such directory)",
                             hint=f"install with: rdna4-install install --prefix '{prefix}'")
    recipes = rcp.load_recipes(folder)
    # an optional component this prefix never asked for is not "pending"
    off = switched_off(recipes, rcp.load_pins(folder / rcp.PINS_FILE),
                       (state.read_receipt(prefix) or {}).get("pins"))
    rows = engine.status(prefix, [n for n in dependency_order(recipes) if n not in off])
    failed = [row["recipe"] for row in rows if row["status"] == "failed"]
    if as_json:
        out: dict[str, Any] = {"prefix": str(prefix), "recipes": rows}
        if failed:
            out["error"] = f"failed: {', '.join(failed)}"
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"status of {prefix}")
        for row in rows:
            problem = f"  ({row['problem']}; a plain install redoes it)" if row["problem"] else ""
            click.echo((f"  {row['recipe']:<18} {row['status']:<22} {_short(row['version']):<20} "
                        f"{row['when']:<21} {row['fingerprint'][:12]}" + problem).rstrip())
            if row["status"] == "failed":
                click.echo(f"      error: {row['error'] or '(not recorded)'}")
                click.echo(f"      log: {row['log']}")
    if failed:
        raise click.exceptions.Exit(1)


@cli.group(epilog=examples("rdna4-install cache add therock-dist-linux-gfx120X-all-10.1.0.tar.gz",
                           "rdna4-install cache add vllm-0.33.0.tar.gz --url URL"))
def cache() -> None:
    """The download cache shared by every prefix ($RDNA4_CACHE_DIR)."""


@cache.command("add", epilog=examples("rdna4-install cache add therock-dist-linux-gfx120X-all-10.1.0.tar.gz",
                                     "rdna4-install cache add ~/Downloads/vllm-0.33.0.tar.gz --url URL",
                                     "rdna4-install cache add *.tar.gz --cache-dir /big/cache"))
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--url", default=None, help="The URL FILE stands for [default: the planned download "
              "with FILE's name].")
@click.option("--gpu-arch", envvar="RDNA4_GPU_ARCH", show_envvar=True, default=None, metavar="ARCH[,ARCH]",
              help="Target, for the toolchain file name [default: every target profile's].")
@click.option("--set", "sets", multiple=True, metavar="RECIPE.KEY=VALUE", help="Pin override, as for install.")
@click.option("--pins", "pins_file", type=click.Path(path_type=Path, dir_okay=False), envvar="RDNA4_PINS",
              show_envvar=True, default=None, help="A TOML file of pins, as for install.")
@recipes_opt
@cache_opt
@pass_obj
def cache_add(obj: Obj, files: tuple[Path, ...], url: str | None, **opts: Any) -> None:
    """Add files downloaded by hand, checked against the pinned or recorded sha256, so --offline finds them."""
    from . import cachefiles
    from .plan import make_plan

    files = tuple(_path(f) for f in files)
    cachefiles.check_files(files, url)
    # without --gpu-arch, FILE may be any target profile's download (each has its own tarball)
    choices = ([opts["gpu_arch"]] if opts.get("gpu_arch") else
               [",".join(p.archs) for p in targetprofile.load_all(
                   _path(opts["recipes_dir"]) if opts.get("recipes_dir") else None).values()])
    planned: dict[str, str] = {}
    for archs in choices:
        try:
            settings = _settings({**opts, "gpu_arch": archs}, obj.ui, need_gpu=False)
        except UsageError:
            if len(choices) == 1:
                raise
            continue   # a profile this prefix cannot hold: its files are not for it
        planned.update(cachefiles.planned_downloads(make_plan(settings)))
    for f, where, got in cachefiles.add(files, url=url, planned=planned,
                                        cache_dir=_path(opts.get("cache_dir") or _default_cache()),
                                        ui=obj.ui):
        obj.ui.success(f"{f.name}: cached as {where} (sha256 {got.sha256})")


def main() -> None:
    # a SIGTERM unwinds like Ctrl-C, so children are killed and nothing is stamped done
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    cli(prog_name="rdna4-install")


if __name__ == "__main__":  # pragma: no cover
    main()
