# CPU image for `ragtune serve`; installs exactly as the Makefile does (make install + models).
FROM python:3.11-slim

# the virtualenv's scripts on PATH: `ragtune`, and `ragtune-haproxy` for Ray Serve's HAProxy
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAGTUNE_HOME=/data/ragtune \
    RAGTUNE_SERVER__HOST=0.0.0.0 \
    RAGTUNE_SERVER__PORT=8000 \
    HF_HUB_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependency layer first so code edits do not reinstall torch.
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY ragtune ragtune
COPY server server
COPY retrieval retrieval
COPY training training
COPY evaluation evaluation
COPY configs configs
# Outside this project's machines the CPU torch build comes from PyTorch's index.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN make install PYTHON=python3 && make models

EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/ready')" || exit 1
CMD [".venv/bin/ragtune", "serve"]
