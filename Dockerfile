# The server image. Envoy runs beside it as the pod's sidecar (deploy/), from Envoy's own image.
#   docker build -t embedding-service .
#   docker run -p 50051:50051 -e EMBED_API_KEYS=my-key -e EMBED__SERVER__HOST=0.0.0.0 embedding-service
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1 \
    EMBED_CACHE_DIR=/var/cache/embedding-service
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
 # Export the default model to ONNX now, so pods start without torch work.
 && python -m service.runtimes.export "$(python -c 'from service.config import default_model_path; print(default_model_path())')" \
 && useradd --uid 10001 --no-create-home embedding && chown -R embedding /var/cache/embedding-service

USER 10001
# grpc, metrics (Envoy's ports live in its sidecar)
EXPOSE 50051 9000
# The pod (deploy/deployment.yaml) adds --config /etc/embedding/config.yaml; every key also reads EMBED__SECTION__KEY.
CMD ["python", "-m", "service"]
