# syntax=docker/dockerfile:1
# The Retrainer image: every process of the split deployment is this image with another command
# (infra/compose/docker-compose.yml, infra/k8s/): `api`, `consume`, `triggers`, `serve-models`,
# `db upgrade`, and `prefect worker start …` (entrypoint `prefect`), whose flow runs import the
# installed `flows` package.
#
#   docker build -t retrainer:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t retrainer:0.1.0-cpu .
#
# TORCH_INDEX_URL empty (the default): torch comes from PyPI exactly as constraints.txt pins it, with
# its CUDA libraries (several GB; what GPU nodes need). For CPU-only nodes pass the PyTorch CPU
# index (`--extra-index-url https://download.pytorch.org/whl/cpu`): pip then picks
# torch==2.15.0+cpu, which satisfies the ==2.15.0 pin, and the image is a fraction of the size.
# Retrainer's ONNX Runtime normalization kernels (ml/quantization/kernels.py), built where a compiler
# and Go (which fetches ONNX Runtime's C API header, pinned by sha256) are; the image only copies the
# library. The build is multi-versioned (AVX-512, AVX2, baseline x86-64), so it runs on any x86-64 node.
FROM golang:1.24-bookworm AS ortops
COPY ml/quantization/native/ /src/
RUN bash /src/build.sh /out/libretrainer_ortops.so

FROM python:3.11-slim

ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid/gid, so Kubernetes can check runAsNonRoot and volumes can be chowned to it.
RUN groupadd --gid 10001 retrainer \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin retrainer \
    && install -d -o 10001 -g 10001 /var/lib/retrainer /app

WORKDIR /tmp/src

# Dependencies first (their own layer: torch is most of the image and changes rarely), then the
# package itself with `pip install -c constraints.txt .`; the source folder is removed afterwards
# so that only the installed copy in site-packages is importable.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements.txt
COPY domain/ domain/
COPY ml/ ml/
COPY web/ web/
COPY storage/ storage/
COPY flows/ flows/
COPY consumers/ consumers/
COPY serving/ serving/
COPY api/ api/
COPY retrainer/ retrainer/
COPY migrations/ migrations/
RUN pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
    && cd / && rm -rf /tmp/src

COPY --from=ortops /out/libretrainer_ortops.so /usr/local/lib/retrainer/libretrainer_ortops.so

WORKDIR /app
# The pipeline specs shipped with the image; compose mounts ./pipelines over them, Kubernetes can
# mount a ConfigMap there.
COPY --chown=10001:10001 pipelines/ /app/pipelines/

# Absolute paths: Prefect's process worker runs each flow in a temporary working directory.
ENV RETRAINER_PIPELINES_DIR=/app/pipelines \
    RETRAINER_ORT_OPS_LIBRARY=/usr/local/lib/retrainer/libretrainer_ortops.so \
    RETRAINER_HOME_DIR=/var/lib/retrainer \
    PREFECT_HOME=/var/lib/retrainer/prefect

USER 10001:10001

ENTRYPOINT ["retrainer"]
CMD ["--help"]
