#!/usr/bin/env bash
# minipacs: install what is missing, then start Orthanc with the plugin, or run the tests.
#   ./minipacs.sh start [orthanc.json]   Orthanc + minipacs on :8042 / DICOM :4242, demo data if empty
#   ./minipacs.sh test [pytest args]     the whole test suite
#   ./minipacs.sh bench                  the benchmarks in bench/ (results in bench/results/)
#   ./minipacs.sh setup [--dev]          only install (apt packages, .venv); --dev adds test tools
# Re-running is fast: apt and pip run only when something is missing or requirements changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
APT_PACKAGES=(orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools python3-venv)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '\033[1mminipacs:\033[0m %s\n' "$*" >&2; }

install_apt() {
  local missing=() p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian's package starts its own Orthanc service on 8042; minipacs runs its own instead.
  if [[ " ${missing[*]} " == *" orthanc "* ]] && command -v systemctl >/dev/null \
      && systemctl is-active --quiet orthanc 2>/dev/null; then
    say "stopping and disabling Debian's orthanc service (it holds port 8042)"
    $SUDO systemctl disable --now orthanc || true
  fi
}

install_venv() {
  local files=(plugin/requirements.txt) mode=runtime stamp
  if [ "${1:-}" = "--dev" ]; then mode=dev; files+=(tests/requirements.txt); fi
  # Orthanc embeds Debian's /usr/bin/python3: the venv must be built on that interpreter.
  if [ ! -x "$VENV/bin/python" ] || ! grep -q "^home = /usr/bin$" "$VENV/pyvenv.cfg"; then
    rm -rf "$VENV"
    say "creating $VENV on /usr/bin/python3"
    /usr/bin/python3 -m venv "$VENV"
  fi
  stamp=$(cat "${files[@]}" | sha256sum | cut -c1-16)
  if ! grep -qx "$stamp" "$VENV/.minipacs-$mode" 2>/dev/null; then
    say "installing Python requirements: ${files[*]}"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${files[@]/#/-r}"
    echo "$stamp" > "$VENV/.minipacs-$mode"
  fi
}

setup() { install_apt; install_venv "${1:-}"; }

orthanc_env() {
  export PYTHONPATH="$VENV/lib/python3.11/site-packages:$ROOT/plugin${PYTHONPATH:+:$PYTHONPATH}"
}

start() {
  local config=${1:-orthanc.json} url pid
  setup
  if grep -q '"AuthenticationEnabled" *: *true' "$config" && [ -z "${MINIPACS_PASSWORD:-}" ]; then
    say "$config enables authentication: set MINIPACS_PASSWORD (and MINIPACS_USER)"; exit 2
  fi
  orthanc_env
  mkdir -p var
  url="http://localhost:$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("HttpPort", 8042))' "$config")"
  Orthanc "$config" &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' INT TERM EXIT
  "$VENV/bin/python" -m minipacs.demo --url "$url" --if-empty || say "demo data not loaded (see above)"
  say "Orthanc + minipacs at $url (try $url/minipacs/counts); Ctrl-C stops"
  wait $pid
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  start) shift; start "$@" ;;
  test)
    shift
    setup --dev
    orthanc_env
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  bench)
    setup --dev
    "$VENV/bin/python" bench/render.py --json bench/results/render.json
    "$VENV/bin/python" bench/png_options.py
    ;;
  *) sed -n '2,7p' "$0" >&2; exit 2 ;;
esac
