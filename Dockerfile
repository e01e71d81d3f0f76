# The recipe inside NVIDIA's NGC PyTorch container, which brings CUDA, NCCL, Transformer Engine
# and apex; this image adds Megatron-Core, energon and the recipe itself.
#   docker build -t megatron-dit .
#   docker run --gpus all --ipc=host -v /data:/data megatron-dit \
#       torchrun --nproc-per-node 8 pretrain_dit.py --model-size DiT-XL --data-path /data/my_dataset
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-dit
# Dependencies first (cached layer); the container's own torch, TE and apex are kept.
COPY pyproject.toml README.md ./
COPY dit/__init__.py dit/
RUN pip install --no-cache-dir -e ".[prep,log]"
COPY . .
ENV OMP_NUM_THREADS=8
CMD ["python", "pretrain_dit.py", "--help"]
