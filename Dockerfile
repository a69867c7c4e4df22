# The code location image for Kubernetes (deploy/values.yaml): adpipe, its Dagster definitions and
# CUDA-enabled torch (PyPI's Linux x86_64 torch wheels are CUDA builds; the GPU nodes bring the driver).
#   docker build -t registry.example/adpipe:1.0 . && docker push registry.example/adpipe:1.0
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ad_models ad_models
COPY pipelines pipelines
RUN pip install --no-cache-dir -e '.[scale]'
# params.yaml for the cluster: execution.executor k8s, execution.k8s.image = this image
COPY params.yaml dagster.yaml dvc.yaml ./
ENV ADPIPE_PARAMS=/app/params.yaml HF_HUB_OFFLINE=1
EXPOSE 3030
CMD ["dagster", "code-server", "start", "-m", "pipelines.definitions", "-h", "0.0.0.0", "-p", "3030"]
