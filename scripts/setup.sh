#!/usr/bin/env bash
# Install what building and testing ATLS needs on a fresh Debian/Ubuntu machine:
# a C toolchain, pkg-config and the OpenSSL headers (the OpenSSL engine links the
# system libssl), and Python with aiocoap, the independent OSCORE peer of the
# interop tests. Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# `setup.sh --build-only` (what scripts/demo.sh runs): only what building
# needs; `atls demo` on its defaults uses no third-party middlebox.
build_only=false
if [ "${1:-}" = "--build-only" ]; then build_only=true; fi

need=()
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev)
# The openssl command makes keys in every PEM form for the key-format test.
command -v openssl >/dev/null 2>&1 || need+=(openssl)

if ! $build_only; then
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)

# Real middleboxes for the HTTP tests: nginx terminating transport TLS,
# tinyproxy as a forward proxy.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || need+=(tinyproxy)
# mitmproxy intercepting transport TLS with its own CA (the deployment demos).
command -v mitmdump >/dev/null 2>&1 || need+=(mitmproxy)
# libcoap's coap-client, an independent CoAP peer of the CoAP tests.
[ -x /usr/bin/coap-client-notls ] || need+=(libcoap3-bin)
fi

if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
# The workspace's rust-version.
required=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -1)
have=$(rustc --version | awk '{print $2}')
if [ -n "$required" ] && [ "$(printf '%s\n%s\n' "$required" "$have" | sort -V | head -1)" != "$required" ]; then
  echo "setup: Rust $have is older than the required $required (rustup update)" >&2
  exit 1
fi
if $build_only; then
  exit 0
fi

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

# Independent peers for the interop tests: aiocoap (OSCORE), pyOpenSSL (a
# memory-BIO TLS client of ATLS over HTTP).
if ! python3 -c 'import aiocoap.oscore, cryptography' >/dev/null 2>&1; then
  echo "setup: installing aiocoap[oscore] (interop peer)" >&2
  pip_install 'aiocoap[oscore]==0.4.17'
fi
if ! python3 -c 'import OpenSSL' >/dev/null 2>&1; then
  echo "setup: installing pyOpenSSL (interop peer)" >&2
  pip_install 'pyOpenSSL==26.4.0'
fi

openssl_version=$(pkg-config --modversion openssl)
case "$openssl_version" in
  1.*|0.*) echo "setup: OpenSSL $openssl_version is too old; 3.0 or newer is required" >&2; exit 1 ;;
esac
