# syntax=docker/dockerfile:1
# bitsmith's image: the one binary on a distroless base (glibc, CA certificates, no shell), running as non-root.
#   make image                 builds ghcr.io/bitsmith-dev/bitsmith:<version>
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target directories are build caches, so a rebuild compiles only what changed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bitsmith \
 && install -D -m 0755 target/release/bitsmith /out/bitsmith

# Debian 12, like the build stage, so the binary finds the glibc it was linked against.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bitsmith /usr/local/bin/bitsmith
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/bitsmith"]
CMD ["controller"]
