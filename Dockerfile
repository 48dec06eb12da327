# The server image. Envoy runs beside it as the pod's sidecar (deploy/), from Envoy's own image.
#   docker build -t embedding-service .
#   docker run -p 50051:50051 -e EMBED_API_KEYS=my-key -e EMBED__SERVER__HOST=0.0.0.0 embedding-service
# It runs unprivileged on a read-only root filesystem (deploy/ sets readOnlyRootFilesystem): nothing it needs at
# run time is written inside the image; scratch files go to /tmp (an emptyDir in the pod).
FROM python:3.11-slim

# EMBED_CACHE_DIR: the ONNX export of the default model, made below at build time and only read at run time.
# HOME: a service user's (none): nothing may count on writing there, and OpenVINO's telemetry, which would phone
# home from a forked child at import, finds no home and stays off.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1 \
    EMBED_CACHE_DIR=/var/cache/embedding-service HOME=/nonexistent
WORKDIR /app

# Dependencies first (cached layer): the CPU build of torch, then the pinned rest.
COPY pyproject.toml constraints.txt README.md ./
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install -c constraints.txt grpcio-tools googleapis-common-protos

COPY proto proto
COPY service service
# Stubs and Envoy's descriptor set are generated, then installed with the package.
RUN python -m service.tools.gen_protos \
 && pip install -c constraints.txt . \
 && cp gen/descriptor.pb /app/descriptor.pb \
 # Export the default model to ONNX now (into EMBED_CACHE_DIR), so pods start without torch work or writes.
 && python -m service.runtimes.export "$(python -c 'from service.config import default_model_path; print(default_model_path())')" \
 && chmod -R a+rX /var/cache/embedding-service \
 && groupadd --gid 10001 embedding \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embedding

# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd (deploy/ sets the same ids).
USER 10001:10001
# grpc, metrics (Envoy's ports live in its sidecar)
EXPOSE 50051 9000
# The pod (deploy/deployment.yaml) adds --config /etc/embedding/config.yaml; every key also reads EMBED__SECTION__KEY.
CMD ["python", "-m", "service"]
