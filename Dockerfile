# syntax=docker/dockerfile:1
# The pipeline image: every stage runs as `python /opt/pneumonia/jobs/<stage>.py --config FILE`.
#   docker build -t REGION-docker.pkg.dev/PROJECT/pneumonia/pneumonia:0.1.0 .
#   docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 ...   (CPU-only image)
#   docker build --build-arg BAKE_WEIGHTS=1 ...   (EfficientNetV2B0 ImageNet weights inside, for offline clusters)
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

# The root filesystem is read-only in the pods; everything that writes (HOME, caches, temp files)
# goes to /tmp, an emptyDir there. Unbuffered output keeps log lines in order under `kubectl logs`.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/pneumonia

# Dependencies first, from pyproject.toml alone, so this layer is rebuilt only when they change
# (TensorFlow is already in the base image at the pinned version and is left as it is).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Declared here, not at the top: an ARG in scope becomes part of the cache key of every later RUN,
# so the dependency layer above stays reused whatever BAKE_WEIGHTS is.
ARG BAKE_WEIGHTS=0
# The weights are fetched once at build time and checked against Keras' own MD5; point the model at
# them with --set model.weights=/opt/pneumonia/weights/efficientnetv2-b0_notop.h5.
RUN if [ "${BAKE_WEIGHTS}" = "1" ]; then \
        python -c "import tf_keras; tf_keras.utils.get_file('efficientnetv2-b0_notop.h5', 'https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/efficientnetv2-b0_notop.h5', file_hash='893217f2bb855e2983157299931e43ff', cache_dir='/opt/pneumonia', cache_subdir='weights')"; \
    fi

# Then the code: the package without its (already installed) dependencies, and the stage entrypoints.
COPY README.md ./
COPY src ./src
COPY jobs ./jobs
RUN python -m pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info src/*.egg-info

# A numeric non-root user, so Kubernetes can check runAsNonRoot without looking the name up.
RUN groupadd --gid 10001 pneumonia \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pneumonia
USER 10001:10001

# Labels last, after every RUN: VERSION and REVISION change with each commit (`make image`), and an
# ARG or LABEL that changes invalidates the cache of everything after it, the 600 MB dependency layer
# included if they came first. BASE_IMAGE is declared again because an ARG before FROM is not in
# scope after it (the label would be empty).
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pneumonia" \
      org.opencontainers.image.description="Batch training suite for a 3-class chest X-ray classifier (normal / bacteria / virus)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENTRYPOINT ["python"]
CMD ["/opt/pneumonia/jobs/train.py", "--help"]
