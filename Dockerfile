# One image for the API, the migrations and the GPU worker (docker-compose.yml picks the command).
# torch from the default index is the CUDA build on Linux, which also runs on CPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /srv
COPY pyproject.toml README.md alembic.ini ./
COPY lafter ./lafter
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
RUN pip install ".[service]"

RUN useradd --create-home --uid 1000 lafter && mkdir -p /data /models && chown lafter /data /models
USER lafter
ENV LAFTER_DATA_DIR=/data \
    HF_HOME=/data/hf

EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
