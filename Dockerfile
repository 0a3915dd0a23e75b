# One image for every Switchboard role; the compose services differ only in command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SWITCHBOARD_DATA_DIR=/var/lib/switchboard \
    SWITCHBOARD_BIND_HOST=0.0.0.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY switchboard ./switchboard
COPY ingest ./ingest
COPY normalize ./normalize
COPY router ./router
COPY sinks ./sinks
RUN pip install . \
    && useradd --system --home /var/lib/switchboard --create-home switchboard

USER switchboard
EXPOSE 2525 8080
ENTRYPOINT ["switchboard"]
CMD ["run"]
