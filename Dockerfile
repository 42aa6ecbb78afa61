# bayestrain on a CUDA PyTorch image. Build and run (needs the NVIDIA container toolkit):
#   docker build -t bayestrain .
#   docker run --gpus all -v $PWD/outputs:/workspace/outputs bayestrain trainer=gpu
# More examples (sweeps, multi-GPU) in docker/README.md.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    WANDB_MODE=offline \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update && apt-get install -y --no-install-recommends fortunes git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# the project's metadata first: the dependency layer is cached while the code changes
COPY pyproject.toml README.md ./
COPY bayestrain ./bayestrain
COPY conf ./conf
COPY scripts ./scripts
COPY docker/entrypoint.sh /usr/local/bin/bayestrain-entrypoint
# torch comes with the base image; the range in pyproject.toml admits it, so pip keeps it
RUN pip install -e ".[hf,sweeps]" && chmod +x /usr/local/bin/bayestrain-entrypoint

ENTRYPOINT ["bayestrain-entrypoint"]
CMD []
