# syntax=docker/dockerfile:1
# demo-server: Rampart's demo gateway (axum HTTP + tonic gRPC).
#
#   docker build -t rampart-demo-server .
#   docker run --rm -p 8080:8080 -p 50051:50051 rampart-demo-server          # in-process backends
#   docker compose up --build                                                # the whole system
#
# Listens on 0.0.0.0:8080 (HTTP, WebSockets) and 0.0.0.0:50051 (gRPC); REDIS_URL, LOCK_NODES,
# DEMO_CONFIG, DEMO_ADMIN_TOKEN as documented in the README.

# ---- dependency skeleton ----------------------------------------------------------------------
# The workspace's manifests and Cargo.lock with a stub for every target file (lib, main, bins,
# benches, examples, tests, build scripts), found by walking the tree: a new member or target
# needs no edit here. Its output only changes when a manifest or the lockfile does, so the
# dependency build below stays cached while sources change.
FROM rust:1.95-bookworm AS skeleton
WORKDIR /src
COPY . .
RUN set -eu; \
    find . -name Cargo.toml -not -path './target/*' | while read -r manifest; do \
        dir="$(dirname "$manifest")"; \
        mkdir -p "/skeleton/$dir"; \
        cp "$manifest" "/skeleton/$dir/"; \
        (cd "$dir"; \
         for target in src/lib.rs src/main.rs build.rs src/bin/*.rs src/bin/*/main.rs \
                       benches/*.rs benches/*/main.rs examples/*.rs examples/*/main.rs \
                       tests/*.rs tests/*/main.rs; do \
             [ -f "$target" ] || continue; \
             mkdir -p "/skeleton/$dir/$(dirname "$target")"; \
             if [ "$target" = src/lib.rs ]; then echo '//! stub'; else echo 'fn main() {}'; fi \
                 > "/skeleton/$dir/$target"; \
         done); \
    done; \
    cp Cargo.lock /skeleton/

# ---- build --------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
# 1. Dependencies only (cached until a manifest or Cargo.lock changes).
COPY --from=skeleton /skeleton/ ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release -p demo-server --locked
# 2. The real sources. COPY keeps their modification times, which may be older than the stub
#    build: touch them, so cargo rebuilds the workspace's crates (not the dependencies). The
#    binary is copied out without the release profile's line tables: ~13 MB instead of ~70 MB
#    (symbols stay, so a panic's backtrace still names functions).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    set -eux; \
    find . -path ./target -prune -o -type f -exec touch {} +; \
    cargo build --release -p demo-server --locked; \
    strip --strip-debug -o /usr/local/bin/demo-server target/release/demo-server

# ---- runtime ----------------------------------------------------------------------------------
# Debian slim (glibc, as the builder): bash for the health check, CA roots for the gateway's
# TLS upstreams (rustls-native-certs).
FROM debian:bookworm-slim
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 rampart; \
    useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin rampart
COPY --from=builder /usr/local/bin/demo-server /usr/local/bin/demo-server
USER 10001:10001
ENV DEMO_HTTP_ADDR=0.0.0.0:8080 \
    DEMO_GRPC_ADDR=0.0.0.0:50051
EXPOSE 8080 50051
# GET /healthz with bash alone (no curl in the image).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# SIGTERM drains in-flight requests and tasks (shutdown_grace_secs).
STOPSIGNAL SIGTERM
ENTRYPOINT ["demo-server"]
