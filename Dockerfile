# Homeward: HL7 v2 (MLLP) in, FHIR R4 out. Configure with HOMEWARD_* variables (see README).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOMEWARD_MLLP_HOST=0.0.0.0 \
    HOMEWARD_MLLP_PORT=2575 \
    HOMEWARD_STORE=/data/homeward.sqlite3 \
    HOMEWARD_OUTBOX_DIR=/data/outbox \
    HOMEWARD_MAPPINGS_DIR=/app/mappings \
    HOMEWARD_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md ./
COPY adapter ./adapter
COPY mappings ./mappings
COPY conformance ./conformance
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --home-dir /data homeward \
 && mkdir -p /data && chown homeward /data

USER homeward
VOLUME ["/data"]
EXPOSE 2575

# Healthy when the listener accepts TCP connections.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python -c "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ['HOMEWARD_MLLP_PORT'])), 3).close()"

ENTRYPOINT ["homeward"]
CMD ["serve"]
