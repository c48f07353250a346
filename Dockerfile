# One image for the server and the workers. Build: docker compose build (or docker build -t avgctl .)
# Stage 1: the dashboard's front-end libraries (uPlot, Swagger UI) from npm, with the lockfile.
FROM node:20-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

# Stage 2: Python, CPU torch, avgctl.
FROM python:3.11-slim-bookworm
# The CPU wheels of torch (a plain `pip install torch` on x86_64 Linux takes the multi-GB CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.4"
ENV PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
WORKDIR /app
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml README.md build_web.py MANIFEST.in ./
COPY protocol ./protocol
COPY server ./server
COPY worker ./worker
COPY web ./web
# The npm files the wheel carries (pyproject's package-data), so the build hook needs no npm here.
COPY --from=web /src/web/node_modules/uplot/dist ./web/node_modules/uplot/dist
COPY --from=web /src/web/node_modules/swagger-ui-dist ./web/node_modules/swagger-ui-dist
RUN pip install --no-cache-dir . && useradd --create-home avgctl && mkdir /data && chown avgctl /data
USER avgctl
EXPOSE 8000
CMD ["avgctl", "serve", "--host", "0.0.0.0", "--db", "/data/avgctl.db"]
