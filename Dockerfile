# One image for the API, the migration job and the workers (docker-compose.yml picks the command).
# torch==2.13.0 from PyPI on Linux is the CUDA build, so the same image trains on GPUs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    STABLETRAIN_STORAGE_DIR=/data/storage

WORKDIR /srv/stabletrain

# dependencies first: the slow layer is rebuilt only when the pins change
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY pyproject.toml ./
COPY app ./app
COPY worker ./worker
COPY stabletrain_export ./stabletrain_export
COPY migrations ./migrations
COPY gunicorn.conf.py ./
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 stabletrain \
    && mkdir -p /data/storage \
    && chown -R stabletrain /data

USER stabletrain
VOLUME ["/data"]
EXPOSE 8000

CMD ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--worker-class", "gthread", "--threads", "4", \
     "--timeout", "120", "app:create_app()"]
