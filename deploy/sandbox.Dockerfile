# syntax=docker/dockerfile:1
#
# sandbox-discord: the stand-in for Discord's HTTP API (crates/sandbox-discord), for
# docker-compose.yml and demos only. NEVER deploy it next to a production guildgate.
# Build from the repository root:
#
#   docker build -f deploy/sandbox.Dockerfile -t guildgate-sandbox-discord:latest .
#
# It seeds one demo guild, role and user and prints their ids (and the OAuth client id,
# secret and bot token) as one JSON line on stdout: `docker compose logs sandbox-discord`.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole workspace manifest is needed (Cargo resolves every member with --locked).
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY config ./config
COPY migrations ./migrations
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sandbox-discord --bin sandbox-discord \
 && install -D -m 0755 target/release/sandbox-discord /out/sandbox-discord

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 sandbox \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin sandbox
COPY --from=builder /out/sandbox-discord /usr/local/bin/sandbox-discord
USER 10001:10001
EXPOSE 8090
ENTRYPOINT ["sandbox-discord"]
CMD ["--addr", "0.0.0.0:8090"]
