# syntax=docker/dockerfile:1
# Multi-stage build: compile waymark (bundled librdkafka, zstd and RocksDB) in a full
# Rust image, run it in a slim Debian with only the runtime libraries, as a non-root
# user.
#
#   docker build -t waymark .
#   docker run --rm waymark --help

FROM rust:1.95-bookworm AS build
# libclang-dev: RocksDB's bindgen; cmake, make, g++: librdkafka and RocksDB (C/C++);
# pkg-config + libssl-dev: librdkafka's SSL/SASL; zlib1g-dev: librdkafka's gzip.
# zstd (librdkafka's zstd codec) is built from source by zstd-sys with the C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libclang-dev pkg-config libssl-dev zlib1g-dev cmake make gcc g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Ship a stripped binary: the release profile keeps line tables for backtraces,
# which with RocksDB's and librdkafka's C++ debug info makes a ~466 MB binary
# (about 17 MB stripped).
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
# build.rs stamps the commit into `waymark --version` ("unknown" here: .git is not
# in the context; pass it with --build-arg WAYMARK_GIT_COMMIT=$(git rev-parse --short=12 HEAD)).
ARG WAYMARK_GIT_COMMIT
ENV WAYMARK_GIT_COMMIT=${WAYMARK_GIT_COMMIT}
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin waymark \
 && cp target/release/waymark /usr/local/bin/waymark

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 waymark \
 && useradd --system --uid 10001 --gid waymark --home-dir /var/lib/waymark --shell /usr/sbin/nologin waymark \
 && mkdir -p /etc/waymark /var/lib/waymark \
 && chown waymark:waymark /var/lib/waymark
COPY --from=build /usr/local/bin/waymark /usr/local/bin/waymark
COPY deploy/waymark.toml /etc/waymark/waymark.toml
USER 10001:10001
# State (RocksDB) must persist across restarts; the config is read-only (mount
# your own file over /etc/waymark/waymark.toml, or use WAYMARK_* variables).
VOLUME ["/var/lib/waymark"]
ENV WAYMARK_STATE_DIR=/var/lib/waymark/state \
    WAYMARK_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
# `waymark health` GETs /healthz on http.listen: exit 0 when healthy, 1 otherwise.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["waymark", "health"]
# `docker run IMAGE` runs the worker; `docker run IMAGE replay ...`, `normalize`,
# `state` run the other commands.
ENTRYPOINT ["waymark"]
CMD ["run", "--config", "/etc/waymark/waymark.toml"]
