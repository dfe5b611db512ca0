# guardproxy: docker build -t guardproxy . && docker run -p 8080:8080 -v $PWD/proxy.yaml:/etc/guardproxy/proxy.yaml guardproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GUARDPROXY_CONFIG=/etc/guardproxy/proxy.yaml \
    GUARDPROXY_HOST=0.0.0.0 \
    XDG_STATE_HOME=/var/lib/guardproxy

WORKDIR /app
# Exactly the locked set (versions and hashes), then guardproxy itself with the locked setuptools.
COPY requirements/runtime.lock ./requirements/runtime.lock
RUN pip install --require-hashes --no-deps -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY guardproxy ./guardproxy
RUN pip install --no-deps --no-build-isolation . && useradd --system --uid 10001 --no-create-home guardproxy \
    && mkdir -p /var/lib/guardproxy/guardproxy/journal && chown -R guardproxy /var/lib/guardproxy
COPY proxy.yaml /etc/guardproxy/proxy.yaml
# Without REDIS_URL the budgets live here (guardproxy/spend.db, the SQLite store), and charges a store
# could not take wait here (guardproxy/journal): mount a volume to keep them across containers.
VOLUME /var/lib/guardproxy

USER guardproxy
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["guardproxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
