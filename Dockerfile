# pullthrough: the mirror on :5000, cache in the /var/lib/pullthrough volume.
#
#   docker build -t pullthrough .
#   docker run -d -p 5000:5000 -v pullthrough-cache:/var/lib/pullthrough pullthrough
#
# Settings come from PULLTHROUGH_<NAME> variables (README, "Configuration") or
# flags after the image name: docker run ... pullthrough serve --workers 4
# No BuildKit-only syntax, so docker-compose 1.29's classic builder builds it too.

# Build stage: the project and its dependencies (wheels from PyPI) into a venv
# without pip; nothing of the build (sources, setuptools, pip) reaches the image.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv --without-pip /opt/pullthrough
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pullthrough/ pullthrough/
COPY proxy/ proxy/
COPY cache/ cache/
COPY metrics/ metrics/
RUN pip --python /opt/pullthrough/bin/python install ".[fast,s3]"

# Runtime stage: the same base image, so the venv's interpreter link still resolves.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 pullthrough \
 && useradd --system --uid 10001 --gid pullthrough --no-create-home \
        --home-dir /var/lib/pullthrough --shell /usr/sbin/nologin pullthrough \
 && mkdir -p /var/lib/pullthrough \
 && chown pullthrough:pullthrough /var/lib/pullthrough
COPY --from=build /opt/pullthrough /opt/pullthrough
ENV PATH=/opt/pullthrough/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PULLTHROUGH_CACHE_DIR=/var/lib/pullthrough
# Declared after the chown above: a new named volume starts as a copy of this
# directory, owned by the pullthrough user.
VOLUME ["/var/lib/pullthrough"]
USER pullthrough:pullthrough
EXPOSE 5000
# Liveness without curl; ignores any HTTP(S)_PROXY set for the upstream, and
# follows PULLTHROUGH_PORT when it is changed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('PULLTHROUGH_PORT', '5000') + '/healthz', timeout=4)"]
ENTRYPOINT ["pullthrough"]
CMD ["serve"]
