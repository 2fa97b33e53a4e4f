# One image for the API and the worker (CPU build of torch). A CUDA worker image, built on a CUDA
# base with the CUDA build of torch, is part of the deployment work.
FROM python:3.11-slim AS base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 INFERQ_DATA_DIR=/data
RUN useradd --create-home --uid 10001 inferq && mkdir /data && chown inferq /data
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md alembic.ini ./
COPY api api
COPY worker worker
COPY shared shared
COPY inferq inferq
COPY migrations migrations
COPY bench bench
RUN pip install --no-cache-dir .
USER inferq
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/readyz').status_code != 200)"
CMD ["inferq", "api", "--host", "0.0.0.0", "--port", "8000"]
