# Two images from one file; docker-compose.yml builds each for its services:
#   target `api`     the API and the one-shot migration: no torch (about 1/10 of the worker's size)
#   target `worker`  training and sampling workers: the same plus torch==2.13.0 (PyPI's Linux build is
#                    the CUDA one, so it trains on GPUs)
#   docker build --target api -t stabletrain-api .  &&  docker build --target worker -t stabletrain-worker .
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    STABLETRAIN_STORAGE_DIR=/data/storage

WORKDIR /srv/stabletrain
RUN useradd --create-home --uid 1000 stabletrain \
    && mkdir -p /data/storage \
    && chown -R stabletrain /data

# dependencies first: the slow layer is rebuilt only when the lock changes. Every package is pinned
# with its hashes (scripts/lock.sh); pip refuses anything else.
COPY requirements-api.lock ./
RUN pip install --require-hashes --no-deps -r requirements-api.lock


FROM base AS api
COPY pyproject.toml gunicorn.conf.py ./
COPY app ./app
COPY worker ./worker
COPY stabletrain_export ./stabletrain_export
COPY stabletrain_storage ./stabletrain_storage
COPY migrations ./migrations
RUN pip install --no-deps -e .
USER stabletrain
VOLUME ["/data"]
EXPOSE 8000
# gunicorn.conf.py (read from the working directory) sets up the Prometheus multiprocess folder
CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "gthread", "--threads", "4", \
     "--timeout", "120", "app:create_app()"]


FROM base AS worker
# torch is the one package outside the lock (its build differs per machine; scripts/lock.sh): its exact
# pin, with the CUDA libraries it depends on
COPY requirements.txt ./
RUN pip install "$(grep '^torch==' requirements.txt)"
COPY pyproject.toml gunicorn.conf.py ./
COPY app ./app
COPY worker ./worker
COPY stabletrain_export ./stabletrain_export
COPY stabletrain_storage ./stabletrain_storage
COPY migrations ./migrations
RUN pip install --no-deps -e .
USER stabletrain
VOLUME ["/data"]
# one job at a time; solo pool so a warm shutdown checkpoints the job and requeues it
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "train", "--concurrency", "1", "--pool", "solo", \
     "--loglevel", "INFO"]
