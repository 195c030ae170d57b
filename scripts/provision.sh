#!/usr/bin/env bash
# Take a fresh Debian 12 / Ubuntu 22.04+ machine, as root, to a working natrace install.
# Used by the README, .ci/run and vagrant/. Idempotent: a second run changes nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NATRACE_VENV:-$here/.venv}
log() { printf 'provision: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "provision: run as root (sudo $0)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
packages=(bpfcc-tools python3-bpfcc libbpfcc python3-venv python3-dev
          gcc g++ make binutils libc6-dbg
          postgresql libpq-dev nodejs npm
          heaptrack valgrind tmux procps util-linux ruby
          libjemalloc2 libtcmalloc-minimal4 libgoogle-perftools4   # other allocators the tests trace
          musl-tools   # musl-gcc: musl programs, static and dynamic, in the tests
          systemtap-sdt-dev   # sys/sdt.h: the in-process sampler's USDT probes
          libsqlite3-dev   # the benchmark's realistic workload (bench/workloads/sqlite_mix.c)
          prometheus     # natrace agent's tests scrape it (they start their own server)
          chromium)  # headless, for the HTML flamegraph tests
# N-API headers (/usr/include/node) are in libnode-dev on Debian 12 and Ubuntu 22.04; a
# nodejs from nodesource ships them itself and conflicts with libnode-dev.
[ -e /usr/include/node/node_api.h ] || packages+=(libnode-dev)
# Rust fixtures (tests/test_names.py): rustup's toolchain when there is one, else Debian's.
command -v rustc >/dev/null || [ -x "$HOME/.cargo/bin/rustc" ] || packages+=(rustc)

apt_updated=
apt_update() { [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }; }

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# nodejs from nodesource already ships npm: don't ask apt for the Debian one then.
if [[ " ${missing[*]} " == *" npm "* ]] && command -v npm >/dev/null; then
    missing=("${missing[@]/npm}")
fi
read -r -a missing <<<"${missing[*]}"
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt_update
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers: bcc will not compile without /lib/modules/$(uname -r)/build.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/include" ]; then
    apt_update
    if apt-cache show "linux-headers-$(uname -r)" >/dev/null 2>&1; then
        log "installing linux-headers-$(uname -r)"
        apt-get install -y -qq "linux-headers-$(uname -r)" >/dev/null
    else
        meta=linux-headers-amd64
        [ "$(dpkg --print-architecture)" = arm64 ] && meta=linux-headers-arm64
        grep -qi ubuntu /etc/os-release && meta=linux-headers-generic
        dpkg-query -W -f='${Status}' "$meta" 2>/dev/null | grep -q 'install ok installed' || {
            log "no headers package for $(uname -r): installing $meta"
            apt-get install -y -qq "$meta" >/dev/null
        }
        build=$(ls -d /usr/src/linux-headers-*-"${meta#linux-headers-}" 2>/dev/null | sort -V | tail -n 1)
        [ -n "$build" ] || build=$(ls -d /usr/src/linux-headers-*-generic 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$build" ]; then
            echo "provision: $meta installed no /usr/src/linux-headers-* directory" >&2
            exit 1
        fi
        # The arch-independent half: Debian's <ver>-common, Ubuntu's bare <ver>.
        common=${build%-*}-common
        [ -d "$common" ] || common=${build%-*}
        [ -d "$common" ] || common=$build
        mkdir -p "$kdir"
        ln -sfn "$build" "$kdir/build"
        ln -sfn "$common" "$kdir/source"
        log "linked $kdir/build -> $build"
    fi
fi

# tracefs and debugfs: bcc attaches uprobes and tracepoints through them.
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug

# The virtualenv sees the OS's bcc through --system-site-packages.
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp=$venv/.natrace-installed
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
    log "installing natrace into $venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$here[test]"
    touch "$stamp"
fi
# natrace's bytecode, as an installed wheel has it: without it an editable install run
# under PYTHONDONTWRITEBYTECODE compiles every module on every start (~0.1 s of each
# command). A module edited since is recompiled in memory as usual.
"$venv/bin/python" -m compileall -q "$here/tracer" >/dev/null
# The in-process sampler (sampler/), built from source with the system compiler into
# sampler/build/ (natrace finds it there: `natrace sampler-path`). make: only when changed.
if ! make -s -q -C "$here/sampler" 2>/dev/null; then
    log "building the in-process sampler"
    make -s -C "$here/sampler" >/dev/null
fi
# Node modules of the end-to-end scenario (tests/e2e/app): npm builds pg-native's
# libpq addon against the system libpq. nodedir=/usr: headers from the OS, no download.
app=$here/tests/e2e/app
app_stamp=$app/node_modules/.natrace-installed
if command -v npm >/dev/null && { [ ! -f "$app_stamp" ] || [ "$app/package-lock.json" -nt "$app_stamp" ]; }; then
    log "installing node modules for tests/e2e/app"
    (cd "$app" && npm_config_nodedir=/usr npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    touch "$app_stamp"
fi
# The BPF programs of the default modes compiled now, for this kernel (natrace caches
# them by source, flags, kernel and bcc): the first trace attaches warm, ~0.5 s instead
# of 2-4 s of compiling. Attach by PID (snapshot, top, record, guard) and launch (run).
if [ "$(id -u)" = 0 ]; then
    sleep 60 &
    idle=$!
    "$venv/bin/natrace" snapshot -p "$idle" --duration 0.1 >/dev/null 2>&1 || true
    kill "$idle" 2>/dev/null || true
    "$venv/bin/natrace" run -- true >/dev/null 2>&1 || true
fi
log "ready: $venv/bin/natrace"
