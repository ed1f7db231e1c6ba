# Minimal CPU image for now: the model package and its CLI. The "deploy" issue completes it (service, GPU target,
# non-root user, healthcheck).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
COPY pyproject.toml README.md ./
COPY aimcore ./aimcore
COPY training ./training
COPY export ./export
COPY service ./service
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && /opt/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 aim
USER aim
ENTRYPOINT ["python", "-m", "aimcore"]
CMD ["info", "aim-demo"]
