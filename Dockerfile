# The recipe inside NVIDIA's NGC PyTorch container, which brings CUDA, NCCL, cuDNN, PyTorch, Transformer
# Engine and apex built for each other (26.05: Ubuntu 24.04, Python 3.12). This image adds Megatron-Core,
# megatron-energon and the recipe, keeping the container's own torch, TE and apex (NGC's pip constraints
# in /etc/pip/constraint.txt pin them).
#   docker build -t megatron-dit .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data megatron-dit \
#       torchrun --nproc-per-node 8 pretrain_dit.py --config examples/configs/dit-xl_image256.yaml --data-path /data/ds
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-dit
# The versions the test suite runs with (inside pyproject.toml's ranges; tests/unit/shipping/test_shipping.py checks both).
RUN pip install --no-cache-dir megatron-core==0.19.2 megatron-energon==7.4.1
# Dependencies first (a cached layer), then the code.
COPY pyproject.toml README.md ./
COPY dit/__init__.py dit/
COPY data/__init__.py data/
RUN pip install --no-cache-dir -e ".[prep,log]"
COPY . .
ENV OMP_NUM_THREADS=8
CMD ["python", "pretrain_dit.py", "--help"]
