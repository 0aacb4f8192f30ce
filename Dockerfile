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
# glibc 2.36 copies 2 KiB and more with `rep movsb`, which on AMD EPYC runs 5-15 times slower when the destination
# lies 1-31 bytes past the source modulo a page; its vector loop copies at full speed at any offset. This covers
# the copies whose addresses bitsmith does not choose (the multipart parser's, TLS, hyper's); see the README's
# Performance section.
ENV GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=2147483647
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/bitsmith"]
CMD ["controller"]
