# aiodp container image, amd64 and arm64 (Grace Hopper / Grace Blackwell nodes are aarch64).
# The base is Debian bookworm-slim pinned by digest (a multi-arch index) with Debian's own
# Python 3.11; `make image-test` builds this same file on a debootstrap'd bookworm minbase,
# which is what Docker's debian:bookworm-slim is made from.
# Stages: `python` = base + Debian's python3; `build` makes the venv from wheelhouse/
# (`make wheels-image` fills it; PIP_NO_INDEX=1 keeps pip off the network); the runtime stage
# is `python` plus the venv, with no pip, no compiler, no apt lists.
# Digest of debian:bookworm-slim as a BuildKit build resolved it in September 2026 (not
# re-resolved here: this machine reaches no registry). Renovate or `docker buildx imagetools
# inspect debian:bookworm-slim` gives a newer one.
ARG DEBIAN_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

FROM ${DEBIAN_IMAGE} AS python
# Debian's python3 within bookworm: the digest above pins the base, the security archive
# moves python3.11's patch level, so the package is not version-pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log

FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ARG PIP_NO_INDEX=""
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_FIND_LINKS=/src/wheelhouse \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY aiodp ./aiodp
# wheelhouse/ comes from `make wheels-image`; a clone without it stops here with that advice
COPY wheelhouse ./wheelhouse
RUN ls wheelhouse/*.whl >/dev/null 2>&1 \
    || { echo "wheelhouse/ has no wheels: run 'make wheels-image' (or 'make image') first" >&2; exit 1; }
# The runtime gets the package and its dependencies only: no pip, setuptools or
# pkg_resources (scanners flag them), no activate scripts, no grpclib protoc plugins, no
# nvidia-ml-py example; bytecode compiled here (unchecked hashes: valid on a read-only root,
# whatever the file times), so no start compiles from source.
RUN python3 -m venv /opt/aiodp \
    && /opt/aiodp/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
    && /opt/aiodp/bin/pip install /tmp/wheels/aiodp-*.whl \
    && /opt/aiodp/bin/pip uninstall --yes setuptools 2>/dev/null || true
RUN /opt/aiodp/bin/pip uninstall --yes pip \
    && rm -f /opt/aiodp/bin/activate* /opt/aiodp/bin/Activate.ps1 /opt/aiodp/bin/protoc-gen-* \
    && rm -f /opt/aiodp/lib/python3*/site-packages/example.py \
    && rm -rf /opt/aiodp/lib/python3*/site-packages/pkg_resources /opt/aiodp/lib/python3*/site-packages/_distutils_hack \
    && find /opt/aiodp -name '__pycache__' -prune -exec rm -rf {} + \
    && /opt/aiodp/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/aiodp/lib

FROM python
ARG VERSION=0.1.0
ARG COMMIT=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="aiodp" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.description="asyncio-native Kubernetes device plugin for NVIDIA GPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/aiodp/aiodp" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
COPY --from=build /opt/aiodp /opt/aiodp
COPY LICENSE /usr/share/doc/aiodp/LICENSE
# NVIDIA's executable names, for the GPU Operator's DaemonSet shape (image/bin/ says why the
# argv0/ link is there)
COPY image/bin/nvidia-device-plugin image/bin/config-manager /usr/bin/
RUN mkdir /opt/aiodp/argv0 && ln -s ../bin/python /opt/aiodp/argv0/nvidia-device-plugin
ENV AIODP_COMMIT=${COMMIT} \
    PATH=/opt/aiodp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "aiodp"]
CMD ["serve"]
