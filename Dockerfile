# AIM service images. One file, three final stages:
#
#   cpu       (default) the HTTP service on CPU: torch CPU build + onnxruntime + faiss-cpu
#   gpu       the service on an NVIDIA GPU: torch CUDA build, onnxruntime-gpu, TensorRT, faiss-gpu
#   pipeline  pre-train / export / index-build jobs (the cpu image plus the train and export extras)
#
#   docker build -t aim-stack:cpu .                                   # cpu (the last stage picks VARIANT=cpu)
#   docker build -t aim-stack:gpu --target gpu .                      # or --build-arg VARIANT=gpu
#   docker build -t aim-stack:pipeline --target pipeline .
#
# Build args: BASE_IMAGE (any Debian-like image with python3.11 and the venv module: python:3.11-slim, a local
# mirror of it, or Debian bookworm with python3-venv), TORCH_SOURCE / GPU_TORCH_SOURCE (a wheel index URL,
# `wheels` for a torch wheel in deploy/wheels/, or `pypi`), TORCH_VERSION, GPU_PACKAGES. A TLS-intercepting proxy's
# CA goes in deploy/certs/extra-ca.crt (build stages only). See docs/DEPLOY.md.
#
# Only the classic builder's features are used (no RUN --mount), and stages are ordered so that
# `--target cpu` never builds the GPU stages even with the classic builder, which builds every earlier stage.

ARG BASE_IMAGE=python:3.11-slim
ARG VARIANT=cpu

# ---------------------------------------------------------------------------------------------------------------
# build-base: an empty venv and the build helpers. Build stages may hold compilers and caches; nothing from them
# reaches a final stage except /opt/venv.
FROM ${BASE_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY deploy/certs/ /tmp/build/certs/
COPY deploy/docker/pip.sh deploy/docker/install-torch.sh deploy/docker/trim-venv.sh deploy/docker/requirements.py \
     /tmp/build/
# python3, not python: Debian's interpreter is python3 only; the official image has both.
RUN chmod +x /tmp/build/pip.sh /tmp/build/install-torch.sh /tmp/build/trim-venv.sh \
    && python3 -m venv /opt/venv

# ---------------------------------------------------------------------------------------------------------------
# builder-cpu: torch first (the largest layer, changes only with its args), then the serve dependencies (change
# with pyproject.toml), then our code. Editing code or docs re-runs only the last, cheap layer.
FROM build-base AS builder-cpu
ARG TORCH_SOURCE=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
COPY deploy/wheels/ /tmp/build/wheels/
RUN /tmp/build/install-torch.sh "$TORCH_SOURCE" "$TORCH_VERSION"
COPY pyproject.toml /tmp/build/src/
# Exact versions of every package (deploy/constraints.txt, generated from a tested env: see its header), so a
# build next month installs what was tested, not the index's latest. pyproject keeps the ranges for library use.
COPY deploy/constraints.txt /tmp/build/constraints.txt
RUN python3 /tmp/build/requirements.py /tmp/build/src/pyproject.toml serve hub > /tmp/build/requirements.txt \
    && /tmp/build/pip.sh install -r /tmp/build/requirements.txt -c /tmp/build/constraints.txt
COPY README.md /tmp/build/src/
COPY aimcore /tmp/build/src/aimcore
COPY export /tmp/build/src/export
COPY service /tmp/build/src/service
COPY training /tmp/build/src/training
# --no-deps: everything is installed above; a wheel (not editable), so the final stage needs no source tree.
RUN /tmp/build/pip.sh install --no-deps /tmp/build/src \
    && /tmp/build/trim-venv.sh

# ---------------------------------------------------------------------------------------------------------------
# runtime-base: what every final stage shares. No compilers, no pip caches, no CA overrides, a non-root user.
FROM ${BASE_IMAGE} AS runtime-base
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    AIM_HOST=0.0.0.0 \
    AIM_PORT=8000 \
    HF_HOME=/models/.cache/huggingface
# A fixed numeric uid: Kubernetes' runAsNonRoot can only verify a numeric USER, and volume ownership is stable.
# /models and /index are created owned by it, so fresh named volumes (which copy the image's folder) are writable.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/aim --shell /usr/sbin/nologin aim \
    && mkdir -p /models/.cache/huggingface /index \
    && chown -R 10001:10001 /models /index
COPY deploy/docker/healthcheck.py /opt/aim/healthcheck.py
WORKDIR /home/aim
EXPOSE 8000
# Generous start period: the service loads the model and runs its self-check at the largest batch before /readyz
# turns 200 (seconds for aim-demo, minutes for AIM-7B on CPU). Health = ready, see healthcheck.py.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/aim/healthcheck.py"]
USER 10001:10001
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------------------------------------------------------
# cpu: the default image. Models and index live on volumes (AIM_MODEL=/models/..., the Hugging Face cache in
# /models/.cache); with no configuration it serves the bundled aim-demo model.
FROM runtime-base AS cpu
COPY --from=builder-cpu /opt/venv /opt/venv
VOLUME ["/models", "/index"]

# ---------------------------------------------------------------------------------------------------------------
# pipeline: one-shot jobs (pre-train, export, index build). The training entry point runs as a script from
# /app, like in the repository: `python training/pretrain.py --config training/configs/aim-debug.yaml ...`.
FROM builder-cpu AS builder-pipeline
# The same constraints: the serve packages already installed keep their versions; the train/export ones are not
# pinned there (the pipeline image is a demo of the jobs, not a served artefact).
RUN python3 /tmp/build/requirements.py /tmp/build/src/pyproject.toml train export > /tmp/build/requirements-pipeline.txt \
    && /tmp/build/pip.sh install -r /tmp/build/requirements-pipeline.txt -c /tmp/build/constraints.txt

FROM runtime-base AS pipeline
COPY --from=builder-pipeline /opt/venv /opt/venv
COPY --chown=10001:10001 training /app/training
WORKDIR /app
HEALTHCHECK NONE
CMD ["python", "training/pretrain.py", "--help"]

# ---------------------------------------------------------------------------------------------------------------
# gpu: the CUDA user-space libraries come from NVIDIA's pip wheels that these packages depend on (cudart, cuBLAS,
# cuDNN, TensorRT libs), so the base stays python:3.11-slim (no Python 3.11 to bolt onto a CUDA base image); the
# driver is mounted by the NVIDIA container toolkit at run time. Every package here must target one CUDA major
# (12 by default): change GPU_TORCH_SOURCE and GPU_PACKAGES together. onnxruntime-gpu finds cuDNN/cuBLAS because
# aimcore imports torch (which loads them) before any session is created.
FROM build-base AS builder-gpu
ARG GPU_TORCH_SOURCE=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG GPU_PACKAGES="onnxruntime-gpu tensorrt-cu12 faiss-gpu-cu12"
COPY deploy/wheels/ /tmp/build/wheels/
RUN /tmp/build/install-torch.sh "$GPU_TORCH_SOURCE" "$TORCH_VERSION"
COPY pyproject.toml /tmp/build/src/
# The CPU builds of onnxruntime and faiss share their import names with the GPU builds: never install them here.
RUN python3 /tmp/build/requirements.py /tmp/build/src/pyproject.toml serve hub --without onnxruntime,faiss-cpu \
        > /tmp/build/requirements.txt \
    && /tmp/build/pip.sh install -r /tmp/build/requirements.txt $GPU_PACKAGES
COPY README.md /tmp/build/src/
COPY aimcore /tmp/build/src/aimcore
COPY export /tmp/build/src/export
COPY service /tmp/build/src/service
COPY training /tmp/build/src/training
RUN /tmp/build/pip.sh install --no-deps /tmp/build/src \
    && /tmp/build/trim-venv.sh

FROM runtime-base AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=builder-gpu /opt/venv /opt/venv
VOLUME ["/models", "/index"]

# ---------------------------------------------------------------------------------------------------------------
# Last stage = what a plain `docker build .` produces: the CPU image unless VARIANT=gpu.
FROM ${VARIANT} AS final
