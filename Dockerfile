# credyt-proxy's image: the release binary on debian:bookworm-slim, non-root (10001:10001),
# read-only apart from /var/lib/credyt-proxy (the outbox).
#
#   docker build -t credyt-proxy .
#   docker run --rm -p 8080:8080 -p 9090:9090 credyt-proxy sandbox     # the demo, no Credyt needed
#   docker run -v SECRETS:/etc/credyt-proxy/secrets:ro -v DATA:/var/lib/credyt-proxy credyt-proxy
#
# `serve` (the default command) reads /etc/credyt-proxy/config/config.toml
# (deploy/kubernetes/base/config.toml: it names the two secret files it needs); any key can be
# overridden with CREDYT_PROXY__SECTION__KEY. The shipped price books are in
# /etc/credyt-proxy/pricing (mount a ConfigMap over it to use your own).
#
# Build arguments: RUST_IMAGE (default rust:1.89-bookworm: Cargo.toml's rust-version, and the
# runtime's Debian release, so the binary's glibc matches) and CARGO_CHEF_VERSION.
# Without registry access, deploy/image/build-base.sh builds debian:bookworm-slim locally.
#
# Stages: chef (toolchain + cargo-chef) -> planner (recipe.json: the dependency graph only) ->
# build (the dependencies cooked in a layer that changes to the project's own files leave
# cached, then the binary at /out/credyt-proxy) -> runtime.

ARG RUST_IMAGE=rust:1.89-bookworm

FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
RUN cargo install cargo-chef --version "${CARGO_CHEF_VERSION}" --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# The dependencies only: this layer is rebuilt when Cargo.toml or Cargo.lock change.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin credyt-proxy
# What building the binary reads: the manifest, the sources and the files built into it
# (include_str!: the sandbox's examples/sandbox/ and pricing/, the admin port's
# docs/openapi.json). The other targets the manifest declares (benches, tests, examples) stay
# cook's empty skeletons, so editing a test does not rebuild the binary.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY pricing ./pricing
COPY examples/sandbox ./examples/sandbox
COPY docs/openapi.json ./docs/openapi.json
RUN cargo build --release --locked --bin credyt-proxy \
    && install -D -m 0755 target/release/credyt-proxy /out/credyt-proxy \
    && strip --strip-debug /out/credyt-proxy

# tests/api/image.rs builds this stage as written, with the host-built binary in place of the
# build stage (it takes the text from the next line to the end of this file): everything the
# runtime needs goes below it, and nothing here may need the network.
FROM debian:bookworm-slim AS runtime
# No packages: reqwest's rustls carries its own root certificates (webpki roots).
# The only path the proxy writes: the outbox of `serve`, the throw-away data of `sandbox`.
# Owned by the proxy's user, so a new named volume mounted here inherits it.
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/credyt-proxy
COPY deploy/kubernetes/base/config.toml /etc/credyt-proxy/config/config.toml
COPY pricing/*.toml /etc/credyt-proxy/pricing/
# `docker run -p 8080:8080 IMAGE sandbox` works as is: the sandbox listens on every interface
# of the container (its defaults are loopback, right on a laptop, unreachable through -p) and
# keeps its data in the one writable path.
ENV CREDYT_PROXY_SANDBOX_LISTEN=0.0.0.0:8080 \
    CREDYT_PROXY_SANDBOX_ADMIN_LISTEN=0.0.0.0:9090 \
    CREDYT_PROXY_SANDBOX_EMULATOR_LISTEN=0.0.0.0:8081 \
    CREDYT_PROXY_SANDBOX_DATA_DIR=/var/lib/credyt-proxy
COPY --from=build /out/credyt-proxy /usr/local/bin/credyt-proxy
USER 10001:10001
WORKDIR /var/lib/credyt-proxy
# tenant API, admin (probes, /metrics), the sandbox's emulator
EXPOSE 8080 9090 8081
ENTRYPOINT ["/usr/local/bin/credyt-proxy"]
CMD ["serve", "--config", "/etc/credyt-proxy/config/config.toml"]
