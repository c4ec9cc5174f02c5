# zhllm on NVIDIA GPUs: training (torchrun, DDP/FSDP2), evaluation and serving.
#   docker build -t zhllm .
#   docker run --gpus all --rm -v "$PWD/work:/work" zhllm pipeline demo --set out_dir=/work/demo
# The base image brings PyTorch with CUDA; zhllm only adds itself and its extras (torch>=2.4 is already met,
# so pip keeps the image's CUDA build). FSDP2 (train.parallel: fsdp) needs PyTorch 2.6 or newer.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# g++: torch.compile's CPU kernels and zhllm's native int8 decode step are built on first use. Its version
# follows the base image's distribution release (a pinned one would break when the base image moves).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/zhllm
COPY pyproject.toml README.md ./
COPY src ./src
# This installs the project from the copied source (DL3013 takes "." for an unpinned index package).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,gguf,tensorboard,wandb,swanlab]"

# Runs, data and checkpoints belong on a mounted volume, not in the image.
WORKDIR /work
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 8000
ENTRYPOINT ["zhllm"]
CMD ["--help"]
