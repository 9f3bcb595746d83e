# Multi-stage build: a static-ish release binary on a small, non-root runtime image.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo reads every declared target, so the bench/test/example sources come along.
COPY benches ./benches
COPY tests ./tests
COPY examples ./examples
COPY loadtest ./loadtest
# The sandbox's built-in demo files include the shipped price books (include_str!).
COPY pricing ./pricing
# The admin port serves the OpenAPI document built into the binary (include_str!).
COPY docs/openapi.json ./docs/openapi.json
RUN cargo build --release --locked --bin credyt-proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/credyt-proxy credyt
COPY --from=build /src/target/release/credyt-proxy /usr/local/bin/credyt-proxy
COPY pricing /etc/credyt-proxy/pricing
USER 10001
WORKDIR /var/lib/credyt-proxy
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/credyt-proxy"]
CMD ["serve", "--config", "/etc/credyt-proxy/config.toml"]
