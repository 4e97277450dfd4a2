#!/usr/bin/env bash
# minipacs: install what is missing, then start Orthanc with the plugin, or run the tests.
#   ./minipacs.sh start [orthanc.json]   Orthanc + minipacs on :8042 / DICOM :4242, demo data if empty
#   ./minipacs.sh serve [orthanc.json]   the same, installing nothing (the Docker image's command)
#   ./minipacs.sh test [pytest args]     the whole test suite
#   ./minipacs.sh train [args]           offline training of the anomaly model (python -m training --help)
#   ./minipacs.sh bench                  the benchmarks in bench/ (results in bench/results/)
#   ./minipacs.sh setup [--dev]          only install (apt packages, .venv, OHIF); --dev adds test tools
# Re-running is fast: apt and pip run only when something is missing or requirements changed.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
TRAIN_VENV=$ROOT/.venv-training
APT_PACKAGES=(orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools python3-venv)
# Headless browser of tests/test_ohif.py (driven by Playwright); Docker and debootstrap build and
# run the image in tests/test_docker.py (and the other release's container in .ci/other-release);
# gcc and orthanc-dev build the stand-in for Orthanc's OHIF plugin of tests/test_official_ohif.py;
# PostgreSQL and Orthanc's PostgreSQL plugins run the two-node cluster of tests/test_cluster.py.
APT_DEV_PACKAGES=(chromium docker.io debootstrap gcc libc6-dev orthanc-dev postgresql orthanc-postgresql)
# Training captures real error dialogs and windows on a virtual X screen (training/realinvalid.py).
APT_TRAIN_PACKAGES=(xvfb zenity xdotool x11-apps x11-utils python3-tk openbox twm xterm xfonts-base
                    xfonts-75dpi fonts-dejavu-core fonts-liberation)
# OHIF 3, served at /ohif/: the npm package @ohif/app ships the built viewer in dist/.
OHIF_VERSION=3.13.2
OHIF=$ROOT/.ohif
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf '\033[1mminipacs:\033[0m %s\n' "$*" >&2; }

install_apt() {
  local wanted=("${APT_PACKAGES[@]}") missing=() p
  [ "${1:-}" = "--dev" ] && wanted+=("${APT_DEV_PACKAGES[@]}" "${APT_TRAIN_PACKAGES[@]}")
  [ "${1:-}" = "--train" ] && wanted+=("${APT_TRAIN_PACKAGES[@]}")
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  # npm fetches OHIF. Any Node.js that brings npm will do (Debian's nodejs + npm, or NodeSource's
  # nodejs, which bundles npm and conflicts with Debian's npm package).
  ohif_installed || command -v npm >/dev/null || missing+=(nodejs npm)
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

# A venv on /usr/bin/python3 (the interpreter Orthanc embeds) holding the requirement files;
# pip runs only when their content changed (a stamp per mode).
build_venv() {
  local venv=$1 mode=$2 stamp
  shift 2
  if [ ! -x "$venv/bin/python" ] || ! grep -q "^home = /usr/bin$" "$venv/pyvenv.cfg"; then
    rm -rf "$venv"
    say "creating $venv on /usr/bin/python3"
    /usr/bin/python3 -m venv "$venv"
  fi
  stamp=$(cat "$@" | sha256sum | cut -c1-16)
  if ! grep -qx "$stamp" "$venv/.minipacs-$mode" 2>/dev/null; then
    say "installing Python requirements: $*"
    "$venv/bin/pip" install -q --disable-pip-version-check "${@/#/-r}"
    echo "$stamp" > "$venv/.minipacs-$mode"
  fi
}

install_venv() {
  local files=(plugin/requirements.txt) mode=runtime
  if [ "${1:-}" = "--dev" ]; then mode=dev; files+=(tests/requirements.txt); fi
  build_venv "$VENV" "$mode" "${files[@]}"
}

# TensorFlow needs numpy < 2 and the plugin numpy 2: training gets a venv of its own.
install_training_venv() { build_venv "$TRAIN_VENV" training training/requirements.txt; }

ohif_installed() {
  [ "$(cat "$OHIF/.minipacs-version" 2>/dev/null)" = "$OHIF_VERSION" ] && [ -f "$OHIF/dist/index.html" ]
}

install_ohif() {
  # Only the package's own tarball: its dist/ is self-contained (no node_modules needed).
  ohif_installed && return
  say "installing OHIF $OHIF_VERSION (npm package @ohif/app) into $OHIF"
  rm -rf "$OHIF.tmp" && mkdir -p "$OHIF.tmp"
  (cd "$OHIF.tmp" && npm pack --silent --cache "$OHIF.tmp/npm-cache" "@ohif/app@$OHIF_VERSION" >/dev/null)
  tar -xzf "$OHIF.tmp/ohif-app-$OHIF_VERSION.tgz" -C "$OHIF.tmp" --no-same-owner
  rm -rf "$OHIF" && mv "$OHIF.tmp/package" "$OHIF" && rm -rf "$OHIF.tmp"
  echo "$OHIF_VERSION" > "$OHIF/.minipacs-version"
}

setup() { install_apt "${1:-}"; install_venv "${1:-}"; install_ohif; }

orthanc_env() {
  # The venv's site-packages, whatever Python version Debian's release has (3.11, 3.13, ...).
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  export PYTHONPATH="$site:$ROOT/plugin${PYTHONPATH:+:$PYTHONPATH}"
}

# Orthanc with the plugin in the foreground, the demo archive loaded if empty; installs nothing.
serve() {
  local config=${1:-orthanc.json} url
  if grep -q '"AuthenticationEnabled" *: *true' "$config" && [ -z "${MINIPACS_PASSWORD:-}" ]; then
    say "$config enables authentication: set MINIPACS_PASSWORD (and MINIPACS_USER)"; exit 2
  fi
  orthanc_env
  mkdir -p var 2>/dev/null || true  # orthanc.json keeps its data there (not the Docker image's)
  url="http://localhost:$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("HttpPort", 8042))' "$config")"
  Orthanc "$config" &
  ORTHANC_PID=$!  # global: the EXIT trap runs after serve has returned
  trap 'stop_orthanc' INT TERM
  trap 'kill $ORTHANC_PID 2>/dev/null; wait $ORTHANC_PID 2>/dev/null || true' EXIT
  "$VENV/bin/python" -m minipacs.demo --url "$url" --if-empty || say "demo data not loaded (see above)"
  say "Orthanc + minipacs at $url (try $url/minipacs/counts); Ctrl-C stops"
  wait "$ORTHANC_PID" || true
}

# Ctrl-C or `docker stop`: Orthanc stops cleanly, and so does this script (status 0).
stop_orthanc() {
  kill -TERM "$ORTHANC_PID" 2>/dev/null || true
  wait "$ORTHANC_PID" 2>/dev/null || true
  trap - EXIT
  exit 0
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  start) shift; setup; serve "$@" ;;
  serve) shift; serve "$@" ;;
  test)
    shift
    setup --dev
    install_training_venv
    orthanc_env
    exec "$VENV/bin/python" -m pytest tests "$@"
    ;;
  train)
    shift
    install_apt --train
    install_training_venv
    PYTHONPATH="$ROOT/plugin:$ROOT" exec "$TRAIN_VENV/bin/python" -m training "$@"
    ;;
  bench)
    shift
    setup --dev
    install_training_venv  # bench/training.py runs in it
    exec "$VENV/bin/python" bench/run_all.py "$@"
    ;;
  *) sed -n '2,11p' "$0" >&2; exit 2 ;;
esac
