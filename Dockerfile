# syntax=docker/dockerfile:1
# Multi-stage build: compile waymark (bundled librdkafka and RocksDB) in a full Rust
# image, run it in a slim Debian with only the runtime libraries, as a non-root user.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev pkg-config libssl-dev zlib1g-dev cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
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
USER waymark
# Config (read-only) and state (RocksDB, must persist across restarts).
VOLUME ["/etc/waymark", "/var/lib/waymark"]
ENV WAYMARK_STATE_DIR=/var/lib/waymark/state \
    WAYMARK_HTTP_LISTEN=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["waymark", "run"]
CMD ["--config", "/etc/waymark/waymark.toml"]
