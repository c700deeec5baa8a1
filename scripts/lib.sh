# Shared by scripts/test and scripts/bench: installs what tests and benches need when missing.
# Works on Debian/Ubuntu (apt-get, with sudo when not root) and macOS (Homebrew).

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  log "installing $* with apt-get"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    as_root apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  }
}

ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 \
    && command -v redis-benchmark >/dev/null 2>&1; then
    return
  fi
  case "$(uname -s)" in
    Darwin) log "installing redis with Homebrew"; brew install redis ;;
    Linux)
      if command -v apt-get >/dev/null 2>&1; then
        apt_install redis-server redis-tools
      else
        log "redis-server is missing and this is not a Debian/Ubuntu system: install Redis >= 7.0 and rerun"
        exit 1
      fi
      ;;
    *) log "unsupported system $(uname -s): install Redis >= 7.0 and rerun"; exit 1 ;;
  esac
  command -v redis-server >/dev/null 2>&1 || { log "redis-server still missing after install"; exit 1; }
}

# Headless Chromium for the demo's browser test.
ensure_chromium() {
  if [ -n "${CHROMIUM_BIN:-}" ] || command -v chromium >/dev/null 2>&1; then
    return
  fi
  case "$(uname -s)" in
    Darwin)
      log "installing chromium with Homebrew"
      brew install --cask chromium
      export CHROMIUM_BIN="/Applications/Chromium.app/Contents/MacOS/Chromium"
      ;;
    Linux)
      if command -v apt-get >/dev/null 2>&1; then
        apt_install chromium
      else
        log "chromium is missing and this is not a Debian/Ubuntu system: install it (or set CHROMIUM_BIN) and rerun"
        exit 1
      fi
      ;;
  esac
}

# nginx and HAProxy, the proxy benchmark's peers.
ensure_proxies() {
  if command -v nginx >/dev/null 2>&1 && command -v haproxy >/dev/null 2>&1; then
    return
  fi
  case "$(uname -s)" in
    Darwin) log "installing nginx and haproxy with Homebrew"; brew install nginx haproxy ;;
    Linux)
      if command -v apt-get >/dev/null 2>&1; then
        apt_install nginx-light haproxy
        # The package starts a system nginx on port 80; the benchmark runs its own.
        as_root service nginx stop >/dev/null 2>&1 || true
      else
        log "nginx/haproxy are missing and this is not a Debian/Ubuntu system: install them and rerun"
        exit 1
      fi
      ;;
  esac
}

# PyYAML, for the cluster test's check that compose.yaml matches scripts/cluster.
ensure_pyyaml() {
  if python3 -c 'import yaml' >/dev/null 2>&1; then
    return
  fi
  log "installing PyYAML with pip"
  python3 -m pip install --quiet pyyaml || log "PyYAML could not be installed: the compose.yaml check will be skipped"
}

# A cargo subcommand from crates.io (cargo-hack for the feature matrix, cargo-semver-checks).
ensure_cargo_tool() {
  local tool="$1" version="$2"
  if cargo "${tool#cargo-}" --version >/dev/null 2>&1; then
    return
  fi
  log "installing $tool $version with cargo install"
  cargo install "$tool" --version "$version" --locked --quiet
}

# The crates that are published; the others (demo-server, benches, testkit, proto) are not.
UNPUBLISHED=(--exclude demo-server --exclude benches --exclude testkit --exclude proto)
