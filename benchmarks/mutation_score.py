"""Mutation score of the safety modules: how many of mutmut's mutants the tests kill.

    uv run --extra test python benchmarks/mutation_score.py [MODULE ...] [--max-children N]

MODULE is one of the keys of MODULES (default: all). Each module runs on its own
copy of the repo (git ls-files, in a temp dir that is removed afterwards) with
a [tool.mutmut] section naming that module and only the test files that cover
it, so a run takes minutes rather than hours on 2 cores. Prints, per module,
killed / total and the other verdicts; a mutant "no tests" is one no selected
test reaches in-process (code run only in a subprocess counts as not killed).

Not part of .ci/run: the whole set takes about an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module -> (files to mutate, test files that cover them, mutant-name globs or None = all)
MODULES: dict[str, tuple[list[str], list[str], list[str] | None]] = {
    "unpack": (["installer/unpack.py"], ["tests/test_unpack.py"], None),
    "download": (["installer/download.py"], ["tests/test_download.py"], None),
    "codeobjects": (["installer/codeobjects.py"], ["tests/test_codeobjects.py"], None),
    "patches": (["installer/patches.py"], ["tests/test_patches.py"], None),
    # pyenv: only the index and guard code (the rest drives uv and is covered end to end)
    "pyenv": (["installer/pyenv.py", "installer/torchindex.py"],
              ["tests/test_torchindex.py", "tests/test_pyenv.py"],
              [f"installer.pyenv.x_{f}__mutmut_*" for f in (
                  "uv_env", "check_index_url", "expect_installed", "_guarded", "installed_versions",
                  "write_constraints", "check_unchanged", "guarded_install")]
              + ["installer.torchindex.*"]),
    "state": (["installer/state.py"], ["tests/test_interrupt.py", "tests/test_engine.py"], None),
}


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                           text=True).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)


def run_module(name: str, max_children: int, keep: Path | None = None) -> dict:
    mutate, tests, names = MODULES[name]
    mutmut = Path(sys.executable).parent / "mutmut"
    with tempfile.TemporaryDirectory(prefix=f"mutmut-{name}-") as tmp:
        # --keep: a directory that stays, for `mutmut show NAME` / `mutmut browse` in it
        root = keep / name if keep else Path(tmp)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _copy_repo(root)
        with open(root / "pyproject.toml", "a", encoding="utf-8") as fh:
            fh.write("\n[tool.mutmut]\n"
                     'source_paths = ["installer"]\n'
                     f"only_mutate = {_toml_list(mutate)}\n"
                     f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
                     'pytest_add_cli_args = ["-p", "no:cacheprovider", "-m", "not slow"]\n'
                     "use_git_change_detection = false\n")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        run = subprocess.run([str(mutmut), "run", "--max-children", str(max_children), *(names or [])],
                             cwd=root, env=env, capture_output=True, text=True)
        subprocess.run([str(mutmut), "export-cicd-stats"], cwd=root, env=env, capture_output=True, check=True)
        stats_file = root / "mutants" / "mutmut-cicd-stats.json"
        if not stats_file.is_file():
            raise SystemExit(f"{name}: mutmut produced no results:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        stats = json.loads(stats_file.read_text())
        survivors = subprocess.run([str(mutmut), "results"], cwd=root, env=env, capture_output=True,
                                   text=True).stdout
    stats["seconds"] = round(time.monotonic() - started)
    stats["survivors"] = [line.strip() for line in survivors.splitlines() if ": survived" in line]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", choices=[[], *MODULES], default=[])
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print every result as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR/MODULE and leave it there (to look at survivors)")
    args = parser.parse_args()
    results = {}
    print(f"{'module':<12} {'killed':>7} {'total':>6} {'score':>6} {'survived':>8} {'no tests':>8} "
          f"{'timeout':>7} {'seconds':>7}")
    for name in args.modules or list(MODULES):
        s = results[name] = run_module(name, args.max_children, args.keep.resolve() if args.keep else None)
        score = 100.0 * s["killed"] / s["total"] if s["total"] else 0.0
        print(f"{name:<12} {s['killed']:>7} {s['total']:>6} {score:>5.1f}% {s['survived']:>8} "
              f"{s['no_tests']:>8} {s['timeout']:>7} {s['seconds']:>7}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
