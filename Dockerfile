# aiodp container image. Multi-stage: wheels are built in the first stage, the runtime stage
# holds only the installed package. BASE_IMAGE must provide python3 with the venv module.
# Offline builds: `make wheels-image` fills wheelhouse/ and PIP_NO_INDEX=1 keeps pip off the
# network (see `make image-test`).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=""
ENV PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_FIND_LINKS=/src/wheelhouse \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY aiodp ./aiodp
COPY wheelhouse ./wheelhouse
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

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG COMMIT=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="aiodp" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.description="asyncio-native Kubernetes device plugin for NVIDIA GPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/aiodp/aiodp"
COPY --from=build /opt/aiodp /opt/aiodp
COPY LICENSE /usr/share/doc/aiodp/LICENSE
ENV AIODP_COMMIT=${COMMIT} \
    PATH=/opt/aiodp/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "aiodp"]
CMD ["serve"]
