# shellcheck shell=bash
# Shared set-up for scripts/test and scripts/demo: a virtual environment with
# this package installed, and a QEMU with vfio-user-pci in $QEMU.
#
#   . scripts/lib/setup.sh; setup_venv; setup_qemu

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${VFIOUSER_VENV:-$ROOT/.venv}

say() { echo "==> $*" >&2; }

find_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
           "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "vfiouser needs Python >= 3.11 (with venv); none found" >&2
    return 1
}

setup_venv() {
    local py stamp want
    if [ ! -x "$VENV/bin/python" ]; then
        py=$(find_python)
        say "creating a virtual environment in $VENV ($("$py" --version))"
        "$py" -m venv "$VENV"
    fi
    # Reinstall only when the packaging metadata or the C extension changed (the install is
    # editable: Python sources are used in place, the C loop is compiled at install time).
    stamp=$VENV/.vfiouser-installed
    want=$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/vfiouser/_fastloop.c" | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        say "installing vfiouser, its test dependencies and SystemRDL support"
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test,rdl]" 2>&1 |
            grep -v "is ignored: it is neither a file nor a directory" >&2 || true
        "$VENV/bin/python" -c 'import vfiouser, construct, pytest, hypothesis, systemrdl, peakrdl_ipxact' ||
            { echo "installing vfiouser failed" >&2; return 1; }
        echo "$want" >"$stamp"
    fi
}

setup_qemu() {
    if [ -n "${QEMU:-}" ]; then
        if "$QEMU" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
            say "using QEMU=$QEMU"; export QEMU; return 0
        fi
        echo "QEMU=$QEMU has no vfio-user-pci device (QEMU >= 10.1 needed)" >&2
        return 1
    fi
    if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
       qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
        QEMU=$(command -v qemu-system-x86_64)
        say "using the system QEMU $QEMU"; export QEMU; return 0
    fi
    say "fetching QEMU with vfio-user-pci into a private prefix (scripts/get-qemu)"
    if ! QEMU=$("$ROOT/scripts/get-qemu" --print-path); then
        echo "could not obtain QEMU with vfio-user-pci (scripts/get-qemu failed); the real-QEMU tests need it" >&2
        return 1
    fi
    export QEMU
    say "using $("$QEMU" --version | head -1) at $QEMU"
}

setup_guest() {
    say "fetching the guest kernel and busybox (scripts/get-guest)"
    if ! VFIOUSER_GUEST=$("$ROOT/scripts/get-guest" --print-dir); then
        echo "could not obtain the guest kernel (scripts/get-guest failed); the guest tests need it" >&2
        return 1
    fi
    export VFIOUSER_GUEST
}

setup_libvfio_user() {
    say "building libvfio-user (scripts/get-libvfio-user)"
    if ! VFIOUSER_LIBVFIO_USER=$("$ROOT/scripts/get-libvfio-user" --print-path); then
        echo "could not build libvfio-user (scripts/get-libvfio-user failed); the tests and the bench that" \
             "compare with it need it" >&2
        return 1
    fi
    export VFIOUSER_LIBVFIO_USER
}
