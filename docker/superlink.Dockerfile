# The stock SuperLink with one addition: /app/state owned by `app`, so that a named volume mounted
# there (the SQLite state) is writable by the non-root user the image runs as. No VOLUME line:
# the compose file names the volume.
#   docker build -f docker/superlink.Dockerfile -t fedsmm/superlink:1.42.0 docker
ARG FLWR_VERSION=1.42.0
FROM flwr/superlink:${FLWR_VERSION}
RUN mkdir -p /app/state
