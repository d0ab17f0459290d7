# One image for every Shoal process: `python -m services.<name>` (deploy/processes/*.yaml pick the module).
# Build: docker build -t shoal:0.1.0 .   (docs/kubernetes.md: loading it into kind, or pushing it to a registry)
#
# Two stages: the build stage has the compiler and libfuse3's headers pyfuse3 builds against; the image keeps only
# the installed environment and the FUSE runtime (libfuse3 and fusermount3).

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libfuse3-dev patch \
 && rm -rf /var/lib/apt/lists/*
# A virtual environment is a folder that can be copied whole into the final stage.
RUN python -m venv /opt/shoal
ENV PATH=/opt/shoal/bin:$PATH
WORKDIR /src
# Only what the package needs (.dockerignore keeps the rest out of the build context).
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
COPY deploy/pyfuse3 ./deploy/pyfuse3
# pyfuse3 rebuilt with the project's patch, as `make venv` does (deploy/pyfuse3/README.md: the mounts' no-open mode).
RUN pip install --no-cache-dir . && sh deploy/pyfuse3/install.sh python

FROM python:3.11-slim
# fuse3 brings fusermount3 and the libfuse3 shared library pyfuse3 was built against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/shoal /opt/shoal
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The services run as this user (uid 10001, matching runAsUser in deploy/processes); the agent's DaemonSet runs the
# same image as root, privileged, because FUSE mounts and mount propagation need it (deploy/processes/agent.yaml).
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent shoal
USER 10001
WORKDIR /tmp
CMD ["shoal", "--help"]
