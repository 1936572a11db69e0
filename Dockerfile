# syntax=docker/dockerfile:1
#
# pinhook: build a wheel, install it with its dependencies into /opt/venv, and copy only
# that venv into a clean image of the same base. The result runs as 65532:65532 with a
# read-only root filesystem: it writes nothing outside /tmp (an emptyDir in the manifests).
#
# Base: python:3.11-slim (Debian trixie), the multi-arch OCI image index as published in
# August 2026. Bump it deliberately, like a dependency: take the "Digest:" line of
#   docker buildx imagetools inspect python:3.11-slim
# Both stages must use the same image: the venv's python is a symlink into it.
ARG PYTHON_IMAGE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY webhook ./webhook
# pip compiles the installed modules to .pyc here, so nothing needs compiling (or writing)
# at run time.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp
# Defaults for a bare `docker run` (the Kubernetes manifests pass flags instead): listen on
# the container's interfaces, and keep generated development certificates under /tmp, the
# only writable place with a read-only root filesystem.
ENV PINHOOK_HOST=0.0.0.0 \
    PINHOOK_CERT_DIR=/tmp/pinhook-tls
COPY --from=builder /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8443
ENTRYPOINT ["/opt/venv/bin/pinhook", "serve"]
