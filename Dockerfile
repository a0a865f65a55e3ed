# rsp image for CI runners and workstations.
#   docker build -t rsp .                                   # CUDA build of torch from PyPI (GPU runners)
#   docker build --build-arg TORCH_SPEC="torch==2.13.0" ...  # pin a specific torch
# On a Jetson, start from NVIDIA's L4T PyTorch image instead and run `pip install -e . --no-deps`.
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4"
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/rsp
# g++ links TVM libraries and builds rsp's CPU kernels; scripts/setup.sh adds the aarch64 cross compiler (Jetson)
COPY scripts/setup.sh ./scripts/setup.sh
RUN apt-get update -q && apt-get install -y -q --no-install-recommends g++ && bash scripts/setup.sh \
    && rm -rf /var/lib/apt/lists/*
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY kernels ./kernels
COPY targets ./targets
RUN pip install -e '.[test,svhn]'
COPY tests ./tests
COPY bench ./bench
ENTRYPOINT ["rsp"]
CMD ["--help"]
