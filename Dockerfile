# M-AI for NVIDIA GPUs: Ray 2.60 (CUDA base image, Python 3.11, user `ray`), torch 2.13.0 with
# its CUDA libraries, DeepSpeed 0.19.8, and M-AI with the `gpu` extra (bitsandbytes,
# accelerate); every other package pinned by docker/constraints.txt.
#
#   make image IMAGE=REGISTRY/m-ai:0.1.0        # or: docker build -t REGISTRY/m-ai:0.1.0 .
#   docker push REGISTRY/m-ai:0.1.0              # the image ray_configs/kuberay_rayservice.yaml names
#   docker run --gpus all --rm REGISTRY/m-ai:0.1.0 bash scripts/gpu_check.sh   # the GPU check
FROM rayproject/ray:2.60.0-py311-gpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /home/ray/m-ai
COPY --chown=ray:users docker/constraints.txt docker/constraints.txt
# torch first (PyPI's Linux wheel is the CUDA build), DeepSpeed without build isolation (its
# setup imports torch), then the project.
RUN pip install torch==2.13.0 \
 && pip install --no-build-isolation -c docker/constraints.txt deepspeed==0.19.8
COPY --chown=ray:users . /home/ray/m-ai
RUN pip install -c docker/constraints.txt -e ".[gpu]" \
 && python -c "import torch, deepspeed, ray, transformers; assert ray.__version__ == '2.60.0'"
ENV PYTHONPATH=/home/ray/m-ai
