#!/bin/sh
# shellcheck shell=dash
#
# Bootstrap for rdna4-install: installs uv for this user if it is missing,
# installs rdna4-install as a uv tool, then runs `rdna4-install install ARGS`.
#
#     curl -fsSL URL | sh -s -- --prefix ~/rdna4 --gpu-arch gfx1201
#     sh install.sh --prefix ~/rdna4 --gpu-arch gfx1201      (in a checkout)
#
# It installs only an exact released version from PyPI, the checkout it sits
# in, or what RDNA4_INSTALLER_SOURCE names (a URL only with its sha256): never
# a branch archive, never a URL the project does not control.
#
# This file holds only function definitions; the last line calls main, so a
# download cut short runs nothing. It never uses sudo: everything goes under
# the user's home (uv's and the XDG directories). Rerunning it updates the tool.

usage() {
    printf '%s\n' "rdna4-install bootstrap: install uv and rdna4-install for this user, then run
'rdna4-install install ARGS'.

Usage:
    curl -fsSL URL | sh -s -- [ARGS...]
    sh install.sh [ARGS...]
    sh install.sh -- --help       (a leading -- passes everything after it, --help included)

Every argument goes to 'rdna4-install install' (e.g. --prefix DIR --gpu-arch gfx1201).

Options handled here:
    -h, --help    print this help and exit (nothing is downloaded)

Environment:
    RDNA4_PREFIX            install prefix (read by rdna4-install)
    RDNA4_CACHE_DIR         download and build cache (read by rdna4-install)
    RDNA4_INSTALLER_SOURCE  where to install rdna4-install from: a checkout, a wheel
                            or sdist file, or an https URL of one (needs
                            RDNA4_INSTALLER_SHA256). Default: the checkout this
                            script is in, else rdna4-install==VERSION from PyPI
    RDNA4_INSTALLER_SHA256  sha256 the file at an RDNA4_INSTALLER_SOURCE URL must have
    RDNA4_VERSION           another released version to install from PyPI (e.g. 0.2.0)
    RDNA4_NO_MODIFY_PATH    if set, do not add uv's tool bin dir to ~/.profile and co.
    RDNA4_UV_INSTALL_URL    uv's installer (default: https://astral.sh/uv/install.sh);
                            if it cannot be used: python3 -m pip install --user uv
    NO_COLOR                if set, no colour in messages
    Other RDNA4_* variables (e.g. RDNA4_GPU_ARCH) are options of
    'rdna4-install install'; see 'sh install.sh -- --help'."
}

# The released version this script installs from PyPI (exact pin; PyPI pins
# each file's hash). scripts/release writes it; empty means no release exists
# yet, so with no RDNA4_INSTALLER_SOURCE and no checkout around the script
# there is nothing safe to install and it stops.
release_version() {
    echo ""
}

default_uv_install_url() {
    echo "https://astral.sh/uv/install.sh"
}

# --- messages: stderr only, so stdout stays the CLI's; bold/colour only on a TTY

_use_colour() {
    [ -t 2 ] && [ -z "${NO_COLOR:-}" ] && [ -n "${TERM:-}" ] && [ "${TERM:-}" != dumb ]
}

_emit() {
    # $1: colour code, $2: label, $3: message
    if _use_colour; then
        printf '\033[1;%sm%s\033[0m %s\n' "$1" "$2" "$3" >&2
    else
        printf '%s %s\n' "$2" "$3" >&2
    fi
}

say() {
    _emit 1 "rdna4-install:" "$1"
}

warn() {
    _emit 33 "warning:" "$1"
}

err() {
    _emit 31 "error:" "$1"
    if [ -n "${2:-}" ]; then
        _emit 1 "hint:" "$2"
    fi
    exit 1
}

# --- checks

check_cmd() {
    command -v "$1" >/dev/null 2>&1
}

need_cmd() {
    for _cmd in "$@"; do
        if ! check_cmd "$_cmd"; then
            err "need '$_cmd' (command not found)" "install it with your system's package manager, then rerun"
        fi
    done
}

# Run a command that must succeed; on failure, die naming it.
ensure() {
    if ! "$@"; then
        err "command failed: $*"
    fi
}

# Run a command whose failure is deliberately ignored.
ignore() {
    "$@" || true
}

assert_nz() {
    if [ -z "$1" ]; then
        err "assertion failed: $2 is empty"
    fi
}

check_platform() {
    _os="$(uname -s)"
    if [ "$_os" != Linux ]; then
        err "rdna4-install supports Linux only (this is $_os)"
    fi
}

# A URL whose host is this machine; only these may use plain http.
is_loopback_url() {
    _rest="${1#*://}"
    _host="${_rest%%/*}"
    _host="${_host##*@}"
    case "$_host" in
        \[::1\] | \[::1\]:*) return 0 ;;
    esac
    _host="${_host%%:*}"
    case "$_host" in
        localhost) return 0 ;;
        *[!0-9.]*) return 1 ;;
        127.*) return 0 ;;
    esac
    return 1
}

# Refuse anything but https (and http to loopback, for tests and local mirrors).
check_url() {
    _scheme="${1%%://*}"
    case "$_scheme" in
        https | git+https) return 0 ;;
        http | git+http)
            if is_loopback_url "$1"; then
                return 0
            fi
            ;;
    esac
    err "refusing '$1': only https:// URLs are allowed (http:// only to localhost)" \
        "use the https:// form of the URL"
}

# --- temp dir with cleanup

cleanup() {
    if [ -n "${_tmpdir:-}" ]; then
        ignore rm -rf "$_tmpdir"
        _tmpdir=""
    fi
}

# Sets RETVAL to a fresh temp dir that is removed on exit.
make_tmpdir() {
    if [ -n "${_tmpdir:-}" ]; then
        RETVAL="$_tmpdir"
        return 0
    fi
    _base="${TMPDIR:-/tmp}"
    if ! _tmpdir="$(mktemp -d "$_base/rdna4-install.XXXXXX")"; then
        _tmpdir=""
        err "cannot create a temporary directory in $_base" "set TMPDIR to a writable directory"
    fi
    trap cleanup EXIT
    trap 'cleanup; exit 130' INT
    trap 'cleanup; exit 143' TERM
    # Installers run what they download from here; a noexec /tmp otherwise
    # fails later with a baffling "permission denied".
    printf '#!/bin/sh\nexit 0\n' >"$_tmpdir/probe"
    chmod +x "$_tmpdir/probe"
    if ! "$_tmpdir/probe" 2>/dev/null; then
        err "cannot execute files in $_base (is it mounted noexec?)" \
            "set TMPDIR to a directory that allows executing files, e.g. TMPDIR=\$HOME/.cache"
    fi
    RETVAL="$_tmpdir"
}

# --- downloads: curl, else wget; https only, TLS >= 1.2, --fail, retries

downloader() {
    _url="$1"
    _out="$2"
    check_url "$_url"
    _proto="=https"
    if is_loopback_url "$_url"; then
        _proto="=http,https"
    fi
    _curl="$(command -v curl 2>/dev/null || true)"
    case "$_curl" in
        */snap/*)
            # snap's curl is confined and cannot write to /tmp.
            if check_cmd wget; then
                _curl=""
            else
                err "curl from snap cannot write to $_out" "install curl or wget with apt/dnf"
            fi
            ;;
    esac
    if [ -n "$_curl" ]; then
        curl --proto "$_proto" --proto-redir "$_proto" --tlsv1.2 --silent --show-error \
            --fail --location --retry 3 --connect-timeout 30 --output "$_out" "$_url"
    elif check_cmd wget; then
        if wget --help 2>&1 | grep -q -- --secure-protocol; then
            if [ "$_proto" = "=https" ]; then
                wget --https-only --secure-protocol=TLSv1_2 --tries=3 --timeout=30 -q -O "$_out" "$_url"
            else
                wget --tries=3 --timeout=30 -q -O "$_out" "$_url"
            fi
        else
            # busybox wget: no TLS options; the https check above still applies.
            wget -q -O "$_out" "$_url"
        fi
    else
        warn "need curl or wget to download $_url"
        return 1
    fi
}

# --- uv

# Sets RETVAL to a usable uv, looking on PATH and where installers put it.
find_uv() {
    if check_cmd uv; then
        RETVAL="$(command -v uv)"
        return 0
    fi
    for _dir in "${UV_INSTALL_DIR:-}" "${XDG_BIN_HOME:-}" "$HOME/.local/bin" "${CARGO_HOME:-$HOME/.cargo}/bin"; do
        if [ -n "$_dir" ] && [ -x "$_dir/uv" ]; then
            RETVAL="$_dir/uv"
            return 0
        fi
    done
    return 1
}

install_uv_with_script() {
    _uv_url="${RDNA4_UV_INSTALL_URL:-$(default_uv_install_url)}"
    check_url "$_uv_url"
    make_tmpdir
    _script="$RETVAL/uv-install.sh"
    say "installing uv from $_uv_url"
    if ! downloader "$_uv_url" "$_script"; then
        warn "could not download uv's installer from $_uv_url"
        return 1
    fi
    # We add the bin dir to PATH ourselves (once, or not at all with
    # RDNA4_NO_MODIFY_PATH), so uv's installer must not edit rc files too.
    if ! UV_INSTALL_DIR="${UV_INSTALL_DIR:-${XDG_BIN_HOME:-$HOME/.local/bin}}" UV_NO_MODIFY_PATH=1 \
        sh "$_script" </dev/null >&2; then
        warn "uv's installer failed"
        return 1
    fi
}

install_uv_with_pip() {
    if ! check_cmd python3; then
        warn "python3 not found, cannot fall back to pip"
        return 1
    fi
    # uv's wheel may already be installed for this python, just not on PATH.
    if uv_from_python; then
        return 0
    fi
    make_tmpdir
    _pip_log="$RETVAL/pip.log"
    say "installing uv with: python3 -m pip install --user uv"
    if ! python3 -m pip install --user --quiet uv </dev/null >"$_pip_log" 2>&1; then
        if grep -q externally-managed-environment "$_pip_log"; then
            # pip's page of PEP 668 text would bury the one thing to do
            err "cannot install uv: its installer is unreachable and this python3 refuses pip --user (PEP 668)" \
                "run 'pipx install uv' (or put a uv binary on PATH), then rerun this script"
        fi
        cat "$_pip_log" >&2
        warn "python3 -m pip install --user uv failed"
        return 1
    fi
    uv_from_python
}

# Sets RETVAL to the uv binary of python3's `uv` package (it knows its own
# scripts dir, user scheme included).
uv_from_python() {
    RETVAL="$(python3 -c 'import uv; print(uv.find_uv_bin())' 2>/dev/null)" && [ -x "$RETVAL" ]
}

# Sets RETVAL to the path of a uv, installing uv for this user if needed.
ensure_uv() {
    if find_uv; then
        return 0
    fi
    if install_uv_with_script && find_uv; then
        return 0
    fi
    warn "falling back to pip for uv"
    if install_uv_with_pip; then
        return 0
    fi
    err "could not install uv" \
        "install it yourself (https://docs.astral.sh/uv/getting-started/installation/) and rerun"
}

# --- the tool

# Sets RETVAL to the checkout this script sits in when it runs as a file from
# one (`sh install.sh` in a clone); under `curl | sh`, $0 is the shell.
checkout_dir() {
    case "$0" in
        install.sh) _dir="." ;;
        */install.sh) _dir="${0%/*}" ;;
        *) return 1 ;;
    esac
    _dir="$(cd "$_dir" 2>/dev/null && pwd)" || return 1
    if [ -f "$_dir/pyproject.toml" ] && grep -q '^name = "rdna4-install"$' "$_dir/pyproject.toml"; then
        RETVAL="$_dir"
        return 0
    fi
    return 1
}

# Sets RETVAL to the sha256 of file $1.
checksum_of() {
    if check_cmd sha256sum; then
        _sum="$(sha256sum "$1")"
    elif check_cmd shasum; then
        _sum="$(shasum -a 256 "$1")"
    elif check_cmd openssl; then
        _sum="$(openssl dgst -sha256 -r "$1")"
    else
        err "need sha256sum, shasum or openssl to check $1" "install coreutils with your system's package manager"
    fi
    RETVAL="${_sum%% *}"
    assert_nz "$RETVAL" "sha256 of $1"
}

# Sets RETVAL to a local copy of the wheel or sdist at URL $1, whose sha256
# must equal RDNA4_INSTALLER_SHA256; a mismatch stops before anything is installed.
fetch_verified() {
    _url="$1"
    check_url "$_url"
    need_cmd tr
    _want="$(printf '%s' "${RDNA4_INSTALLER_SHA256:-}" | tr 'A-F' 'a-f')"
    case "$_want" in
        "")
            err "refusing $_url: RDNA4_INSTALLER_SHA256 is not set" \
                "set RDNA4_INSTALLER_SHA256 to the sha256 published with that file"
            ;;
        *[!0-9a-f]*)
            err "RDNA4_INSTALLER_SHA256 is not a sha256 (64 hex digits)" "copy it again from the release"
            ;;
    esac
    if [ "${#_want}" -ne 64 ]; then
        err "RDNA4_INSTALLER_SHA256 is not a sha256 (64 hex digits)" "copy it again from the release"
    fi
    _name="${_url%%[?#]*}"
    _name="${_name##*/}"
    case "$_name" in
        *[!A-Za-z0-9._+-]* | "") err "$_url does not name a wheel or sdist file" "use the URL of a .whl or .tar.gz" ;;
        *.whl | *.tar.gz) ;;
        *) err "$_url does not name a wheel or sdist file" "use the URL of a .whl or .tar.gz" ;;
    esac
    make_tmpdir
    _file="$RETVAL/$_name"
    if ! downloader "$_url" "$_file"; then
        err "could not download $_url" "check the URL and the network, then rerun"
    fi
    checksum_of "$_file"
    if [ "$RETVAL" != "$_want" ]; then
        ignore rm -f "$_file"
        err "sha256 mismatch for $_url: expected $_want, got $RETVAL; nothing was installed" \
            "check RDNA4_INSTALLER_SHA256 against the release; if it is right, the file was changed"
    fi
    RETVAL="$_file"
}

# Sets RETVAL to the `uv tool install` argument for RDNA4_INSTALLER_SOURCE $1:
# a checkout, a wheel or sdist file, or an https URL of one (sha256-checked).
source_spec() {
    _src="$1"
    case "$_src" in
        *://*)
            fetch_verified "$_src"
            return 0
            ;;
    esac
    if [ -d "$_src" ]; then
        if [ ! -f "$_src/pyproject.toml" ]; then
            err "$_src is not a checkout of rdna4-install (no pyproject.toml)" \
                "set RDNA4_INSTALLER_SOURCE to a checkout, a wheel file, or an https URL"
        fi
        RETVAL="$(cd "$_src" && pwd)"
        return 0
    fi
    if [ -f "$_src" ]; then
        case "$_src" in
            *.whl | *.tar.gz) ;;
            *) err "$_src is not a wheel (.whl) or sdist (.tar.gz)" "point RDNA4_INSTALLER_SOURCE at one" ;;
        esac
        case "$_src" in
            */*) RETVAL="$(cd "${_src%/*}" && pwd)/${_src##*/}" ;;
            *) RETVAL="$(pwd)/$_src" ;;
        esac
        return 0
    fi
    err "installer source $_src does not exist" \
        "set RDNA4_INSTALLER_SOURCE to a checkout, a wheel file, or an https URL (with RDNA4_INSTALLER_SHA256)"
}

# Sets RETVAL to what `uv tool install` gets: RDNA4_INSTALLER_SOURCE, else the
# checkout this script is in, else exactly the released version from PyPI.
installer_source() {
    if [ -n "${RDNA4_INSTALLER_SOURCE:-}" ]; then
        if [ -n "${RDNA4_VERSION:-}" ]; then
            warn "RDNA4_INSTALLER_SOURCE is set, so RDNA4_VERSION=$RDNA4_VERSION is ignored"
        fi
        source_spec "$RDNA4_INSTALLER_SOURCE"
        return 0
    fi
    if checkout_dir; then
        return 0
    fi
    _version="${RDNA4_VERSION:-$(release_version)}"
    if [ -z "$_version" ]; then
        err "this install.sh is not from a release, so it has no version to install" \
            "run it from a checkout (sh install.sh ...) or set RDNA4_INSTALLER_SOURCE to a checkout, a wheel, or an https URL"
    fi
    case "$_version" in
        *[!A-Za-z0-9._+-]*) err "RDNA4_VERSION='$_version' is not a version" "use e.g. RDNA4_VERSION=0.2.0" ;;
    esac
    RETVAL="rdna4-install==${_version#v}"
}

install_tool() {
    _uv="$1"
    _spec="$2"
    # --force replaces an rdna4-install left in the bin dir by another installer;
    # --reinstall-package rebuilds it even when the source path is unchanged
    # (a checkout moves on), which is what makes rerunning update.
    ensure "$_uv" tool install --force --reinstall-package rdna4-install \
        --python ">=3.10" "$_spec" </dev/null >&2
}

# Sets RETVAL to uv's tool executable dir.
tool_bin_dir() {
    if ! RETVAL="$("$1" tool dir --bin)"; then
        err "'$1 tool dir --bin' failed (uv too old?)" "update uv with 'uv self update' and rerun"
    fi
    assert_nz "$RETVAL" "uv tool bin dir"
}

# --- PATH for future shells: one guarded line per rc file, added once

path_line() {
    # $PATH stays literal: the rc file expands it when a shell starts.
    # shellcheck disable=SC2016
    printf 'case ":$PATH:" in *":%s:"*) ;; *) export PATH="%s:$PATH" ;; esac  # added by rdna4-install\n' "$1" "$1"
}

add_to_rc() {
    _rc="$1"
    _line="$2"
    if [ -f "$_rc" ] && grep -qxF "$_line" "$_rc"; then
        return 0
    fi
    if ! printf '\n%s\n' "$_line" >>"$_rc"; then
        warn "could not write to $_rc; add $3 to PATH yourself"
        return 0
    fi
    say "added $3 to PATH in $_rc (new shells will see it)"
}

ensure_on_path() {
    _dir="$1"
    if [ -n "${RDNA4_NO_MODIFY_PATH:-}" ]; then
        return 0
    fi
    case ":${PATH:-}:" in
        *":$_dir:"*) return 0 ;;
    esac
    case "$_dir" in
        *[\"\$\`\\]*)
            warn "not adding $_dir to PATH (it has shell-special characters); add it yourself"
            return 0
            ;;
    esac
    _line="$(path_line "$_dir")"
    add_to_rc "$HOME/.profile" "$_line" "$_dir"
    # bash and zsh do not read ~/.profile in every kind of shell.
    for _rc in "$HOME/.bashrc" "${ZDOTDIR:-$HOME}/.zshrc"; do
        if [ -f "$_rc" ]; then
            add_to_rc "$_rc" "$_line" "$_dir"
        fi
    done
}

main() {
    # Tests source this file with RDNA4_INSTALL_SH_TESTING=1 to call single functions.
    if [ "${RDNA4_INSTALL_SH_TESTING:-}" = 1 ]; then
        return 0
    fi
    set -u
    for _arg in "$@"; do
        case "$_arg" in
            --) break ;;
            -h | --help)
                usage
                return 0
                ;;
        esac
    done
    if [ "${1:-}" = "--" ]; then
        shift
    fi

    need_cmd uname mkdir mktemp chmod rm grep
    check_platform
    if [ -z "${HOME:-}" ]; then
        err "HOME is not set" "run this as a normal user with a home directory"
    fi

    # the source first: a wrong checksum stops before even uv is installed
    installer_source
    _spec="$RETVAL"
    ensure_uv
    _uv="$RETVAL"
    say "installing rdna4-install from $_spec (uv: $_uv)"
    install_tool "$_uv" "$_spec"
    tool_bin_dir "$_uv"
    _bin="$RETVAL"
    _tool="$_bin/rdna4-install"
    if [ ! -x "$_tool" ]; then
        err "uv finished but $_tool is missing"
    fi
    ensure_on_path "$_bin"

    cleanup
    trap - EXIT INT TERM
    say "running: $_tool install $*"
    # Under `curl | sh` stdin is the spent pipe; give an interactive user the terminal back.
    if [ ! -t 0 ] && [ -t 2 ] && (: </dev/tty) 2>/dev/null; then
        exec "$_tool" install "$@" </dev/tty
    fi
    exec "$_tool" install "$@"
}

main "$@"
