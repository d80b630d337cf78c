# syntax=docker/dockerfile:1
#
# gpufleet image: one image for every role (dispatcher, trigger, worker, or all of them with `gpufleet run`).
#
#   docker build -t gpufleet .
#   docker run --rm gpufleet gpufleet check
#
# torch and CUDA:
# - `pip install torch` from PyPI on linux/amd64 gives the CUDA-enabled wheel, which brings the CUDA runtime
#   libraries as nvidia-* wheels; the driver comes from the host through the NVIDIA Container Toolkit. That is
#   enough to run on a GPU from this slim base.
# - For a specific CUDA version, either base on an nvidia/cuda:<version>-runtime image (BASE_IMAGE; it has no
#   Python 3.11, so install it there first) or install the CUDA torch wheel built for that version
#   (TORCH_SPEC / PIP_EXTRA_ARGS).
# - The CPU build pinned as torch==2.13.0 (+cpu) in the development and CI environment is only for tests:
#   do not copy that pin here, it has no CUDA.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch gets its own layer, before the source is copied: it is by far the largest download, and this way editing
# gpufleet's code does not download it again. Keep TORCH_SPEC in step with the `torch` extra in pyproject.toml.
# TORCH_INDEX_URL (compose's CPU overlay sets PyTorch's CPU index, so no CUDA wheels come down): torch comes from
# there when it answers, else from the default index. Progress bars stay on: this download is large.
ARG TORCH_SPEC="torch>=2.2"
ARG TORCH_INDEX_URL=""
ARG PIP_EXTRA_ARGS=""
RUN if [ -n "$TORCH_INDEX_URL" ] && python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)' "$TORCH_INDEX_URL" 2>/dev/null; then \
      pip install --progress-bar on ${PIP_EXTRA_ARGS} --index-url "$TORCH_INDEX_URL" \
        --extra-index-url https://pypi.org/simple "${TORCH_SPEC}"; \
    else \
      if [ -n "$TORCH_INDEX_URL" ]; then echo "$TORCH_INDEX_URL does not answer: torch from the default index"; fi; \
      pip install --progress-bar on ${PIP_EXTRA_ARGS} "${TORCH_SPEC}"; \
    fi

# The package itself, with the torch extra (already satisfied above). A regular, non-editable install into
# site-packages, so the build folder can go. README.md* matches nothing when there is no README yet.
COPY pyproject.toml README.md* /tmp/gpufleet/
COPY src /tmp/gpufleet/src
RUN pip install ${PIP_EXTRA_ARGS} "/tmp/gpufleet[torch]" && rm -rf /tmp/gpufleet

# Everything runs as an unprivileged user. The code and settings stay owned by root, so they are read-only to it.
RUN groupadd --system --gid 10001 gpufleet \
 && useradd --system --uid 10001 --gid gpufleet --home-dir /home/gpufleet --create-home \
      --shell /usr/sbin/nologin gpufleet

WORKDIR /app
# Defaults baked into the image; docker-compose.yml mounts the repository's copies over these, read-only, so
# functions and triggers can change without a rebuild (restart the services to load them).
COPY config ./config
COPY triggers ./triggers
COPY workers ./workers

# fleet.yaml finds ../workers and ../triggers relative to itself, i.e. /app/workers and /app/triggers.
ENV GPUFLEET_CONFIG=/app/config/fleet.yaml

USER gpufleet
CMD ["gpufleet", "run"]
