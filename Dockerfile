# Baton's container image (docs/kubernetes.md).
#   docker build -t baton:0.1.0 .                      CPU: simulated and transformers engines
#   docker build --target gpu -t baton:0.1.0-gpu .     NVIDIA GPUs: the vLLM engine on CUDA
# The entrypoint is the `baton` command line: `docker run baton:0.1.0 serve` serves the
# default embedded graph; on Kubernetes each pod's args name its command (worker, frontend...).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The gpu target's base: vLLM's image, with the CUDA and vLLM your nodes' drivers take.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0

# ---------------------------------------------------------------- build: a venv with Baton
FROM ${PYTHON_IMAGE} AS build
# hf: the transformers engine on CPU (torch's CPU build, from the PyTorch CPU index, never a
# CUDA one); kubernetes: the operator; tracing: OpenTelemetry's exporter. EXTRAS=kubernetes
# keeps the simulated engine and the operator only (a much smaller image).
ARG EXTRAS=hf,kubernetes,tracing
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/baton
WORKDIR /src
COPY pyproject.toml README.md ./
COPY baton ./baton
RUN if [ -n "${EXTRAS}" ]; then \
        /opt/baton/bin/pip install --extra-index-url "${TORCH_INDEX}" ".[${EXTRAS}]"; \
    else \
        /opt/baton/bin/pip install .; \
    fi

# ---------------------------------------------------------------- gpu: vLLM on CUDA
# vLLM's own image carries CUDA, a CUDA torch and vLLM; Baton installs beside them.
FROM ${VLLM_IMAGE} AS gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY baton /src/baton
RUN pip install "/src[kubernetes,tracing]" \
    && useradd --uid 10001 --create-home baton \
    && mkdir -p /var/cache/baton && chown baton /var/cache/baton
ENV BATON_CACHE_DIR=/var/cache/baton
USER 10001
ENTRYPOINT ["baton"]
CMD ["--help"]

# ---------------------------------------------------------------- cpu (the default)
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --uid 10001 --create-home baton \
    && mkdir -p /var/cache/baton && chown baton /var/cache/baton
COPY --from=build /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH BATON_CACHE_DIR=/var/cache/baton PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/baton
EXPOSE 8000
ENTRYPOINT ["baton"]
CMD ["serve", "--host", "0.0.0.0"]
