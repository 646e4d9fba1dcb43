# syntax=docker/dockerfile:1
# The site agent: one binary next to a hospital's data; it only connects out.
# Build from the repository root: docker build -f deploy/docker/agent.Dockerfile -t medfl-agent .
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p medfl-site-agent --bin medfl-agent \
    && strip target/release/medfl-agent

# Slim rather than distroless: OpenDP's secure samplers link the system's libssl3.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 medfl \
    && useradd --system --uid 10001 --gid medfl --home-dir /var/lib/medfl --no-create-home medfl \
    && install -d -o medfl -g medfl -m 0700 /var/lib/medfl
COPY --from=build /src/target/release/medfl-agent /usr/local/bin/medfl-agent
USER 10001:10001
WORKDIR /var/lib/medfl
ENTRYPOINT ["/usr/local/bin/medfl-agent"]
