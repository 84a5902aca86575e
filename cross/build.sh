#!/usr/bin/env bash
# Cross-build ternd, ternctl and tern-update for ARM boxes with Debian's cross toolchains (no
# Docker), smoke-test each under qemu-user, print binary sizes, and make the .deb packages.
#
#   cross/build.sh [--setup] [--no-deb] [TARGET...]
#
# TARGET: aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf (both by default) or
# x86_64-unknown-linux-gnu (the host; packaged, not emulated). --setup installs the toolchains,
# qemu-user, the Rust targets and cargo-deb first (root, apt and crates.io).
#
# The smoke test runs, under qemu, `ternd infer` on every shipped model's golden inputs and on
# the demo images, and expects the same top class (or the same refusal) as the host's ternd;
# `ternd check-config` on the example configs; and ternctl and tern-update (a key, a signed
# command, verified). Exit status is non-zero on the first difference.
set -euo pipefail
cd "$(dirname "$0")/.."

setup=0
deb=1
targets=()
for a in "$@"; do
    case "$a" in
    --setup) setup=1 ;;
    --no-deb) deb=0 ;;
    -*) echo "cross/build.sh: unknown option $a" >&2; exit 2 ;;
    *) targets+=("$a") ;;
    esac
done
((${#targets[@]})) || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

gnu_triple() {
    case "$1" in
    aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
    x86_64-unknown-linux-gnu) echo x86_64-linux-gnu ;;
    *) echo "cross/build.sh: unsupported target $1" >&2; exit 2 ;;
    esac
}
qemu_for() {
    case "$1" in
    aarch64-unknown-linux-gnu) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
    x86_64-unknown-linux-gnu) echo "" ;;
    esac
}

if ((setup)); then
    pkgs=(qemu-user)
    for t in "${targets[@]}"; do
        case "$t" in
        aarch64-*) pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armv7-*) pkgs+=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
        esac
    done
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
    rustup target add "${targets[@]}"
    if ((deb)) && ! cargo deb --version >/dev/null 2>&1; then
        cargo install --locked cargo-deb
    fi
fi

# The host's answers are the reference: the debug ternd the tests use is built the same way.
cargo build --quiet -p ternd --bin ternd
host=target/debug/ternd
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

top_class() {
    # `ternd infer --json` → the first label, or `refused(<exit code>)`.
    local out code=0
    out=$("$@" 2>/dev/null) || code=$?
    if ((code)); then
        echo "refused($code)"
    else
        local re='"label":"([^"]*)"'
        if [[ $out =~ $re ]]; then echo "${BASH_REMATCH[1]}"; else echo "no-label"; fi
    fi
}

# The plan `ternd infer --json` ran on (what `auto` chose), or `-`.
plan_of() {
    local out re='"plan":"([^"]*)"'
    out=$("$@" 2>/dev/null) || true
    if [[ $out =~ $re ]]; then echo "${BASH_REMATCH[1]}"; else echo "-"; fi
}

smoke() {
    local t=$1 bin=$2 run
    run=$(qemu_for "$t")
    local checked=0 plans=()
    for pkg in firmware-updates/models/*/; do
        pkg=${pkg%/}
        [[ -f $pkg/tern-model.toml ]] || continue
        # onnxruntime runs the broken fixtures right (they break tract's reading): both sides
        # plan them with tract alone.
        plan=auto
        [[ $pkg == *-broken ]] && plan=tract
        inputs=("$pkg"/golden/*-input.npy "$pkg"/golden/*.npz)
        [[ $pkg == *digits* ]] && inputs+=(configs/demo/inbox/*)
        for input in "${inputs[@]}"; do
            [[ -f $input ]] || continue
            want=$(top_class "$host" infer --model "$pkg" --input "$input" --json --plan "$plan")
            got=$(top_class env -u ORT_DYLIB_PATH $run "$bin/ternd" infer --model "$pkg" \
                --input "$input" --json --plan "$plan")
            if [[ $want != "$got" ]]; then
                echo "$t: $pkg on $input: host says $want, $t says $got" >&2
                return 1
            fi
            checked=$((checked + 1))
        done
        # What auto chose there (qemu times nothing as the real core would: which, not how fast).
        input=("$pkg"/golden/0-input.npy "$pkg"/golden/0.npz)
        for i in "${input[@]}"; do
            [[ -f $i ]] || continue
            plans+=("${pkg##*/}: $(plan_of env -u ORT_DYLIB_PATH $run "$bin/ternd" infer --model "$pkg" --input "$i" --json)")
            break
        done
    done
    if ((checked == 0)); then
        echo "$t: no inputs were compared" >&2
        return 1
    fi
    echo "$t: ternd infer agrees with the host on $checked inputs"
    echo "$t: plans auto chose under qemu: $(IFS=,; echo "${plans[*]}")"
    for c in configs/demo.toml configs/fleet-demo.toml; do
        $run "$bin/ternd" check-config --config "$c" >/dev/null
    done
    echo "$t: ternd check-config passes on the example configs"
    $run "$bin/ternctl" --version >/dev/null
    code=0
    $run "$bin/ternctl" --bus "unix:path=$work/no-bus" status 2>/dev/null || code=$?
    if ((code != 69)); then
        echo "$t: ternctl without a bus exited $code, not 69" >&2
        return 1
    fi
    $run "$bin/tern-update" keygen --out "$work/$t.key" >/dev/null
    $run "$bin/tern-update" sign-command --key "$work/$t.key" --target box-1 --name status \
        --id smoke-1 >"$work/$t.cmd"
    grep -q '"sig"' "$work/$t.cmd"
    echo "$t: ternctl and tern-update run (Ed25519 key and signed command)"
}

# What a box needs from the package: a glibc floor, the symlink, the config as a conffile,
# the unit and the bus policy.
check_deb() {
    local d=$1 contents
    dpkg-deb -f "$d" Depends | grep -q 'libc6' || { echo "$d: no libc6 in Depends" >&2; return 1; }
    contents=$(dpkg-deb -c "$d")
    for want in './usr/bin/ternd' './usr/bin/ternctl -> ternd' './etc/tern/ternd.toml' \
        './usr/lib/systemd/system/ternd.service' './usr/share/dbus-1/system.d/io.tern.Daemon1.conf' \
        './usr/share/tern/models/digits-cnn-int8/model.onnx' \
        './usr/share/tern/models/iris-mlp-int8/model.onnx'; do
        grep -qF -- "$want" <<<"$contents" || { echo "$d: $want missing" >&2; return 1; }
    done
    dpkg-deb --ctrl-tarfile "$d" | tar -xO ./conffiles | grep -qx /etc/tern/ternd.toml ||
        { echo "$d: /etc/tern/ternd.toml is not a conffile" >&2; return 1; }
    echo "$d: $(dpkg-deb -f "$d" Architecture), Depends: $(dpkg-deb -f "$d" Depends)"
}

sizes=()
for t in "${targets[@]}"; do
    gnu_triple "$t" >/dev/null
    echo "== $t"
    # ternctl ships as a symlink to ternd (one copy of tract on the box), and runs as one here.
    cargo build --release --config cross/config.toml --target "$t" \
        -p ternd --bin ternd -p tern-update-cli --bin tern-update
    bin=target/$t/release
    ln -sf ternd "$bin/ternctl"
    smoke "$t" "$bin"
    for b in ternd tern-update; do
        sizes+=("$t $b $(stat -c %s "$bin/$b")")
    done
    if ((deb)); then
        d=$(cargo deb --no-build --no-strip --target "$t" -p ternd --output target/debian/ | tail -1)
        cargo deb --no-build --no-strip --target "$t" -p tern-update-cli --output target/debian/
        check_deb "$d"
    fi
done

echo
echo "binary sizes (release profile: $(grep -A4 '^\[profile.release\]' Cargo.toml | grep -v '^\[' | grep -v '^#' | tr '\n' ' '))"
for s in "${sizes[@]}"; do
    read -r t b n <<<"$s"
    awk -v t="$t" -v b="$b" -v n="$n" 'BEGIN { printf "  %-32s %-12s %6.1f MiB\n", t, b, n / 1048576 }'
done
if ((deb)); then
    ls -l target/debian/*.deb
fi
