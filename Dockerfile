# minipacs: Orthanc + the minipacs plugin, from Debian's packages, running as Debian's `orthanc` user.
#   docker build -t minipacs .
#   docker run -p 8042:8042 -p 4242:4242 -e MINIPACS_PASSWORD=... -v minipacs:/var/lib/minipacs minipacs
# Layers from the least to the most often changed: Debian packages, the plugin's Python
# requirements, OHIF (fetched in a stage of its own, so Node.js stays out of the image), the code.

FROM debian:bookworm-slim AS ohif
RUN apt-get update -q && apt-get install -y -q --no-install-recommends nodejs npm ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY minipacs.sh ./
# The version minipacs.sh pins; the source maps (38 MB) are for debugging OHIF itself.
RUN version=$(sed -n 's/^OHIF_VERSION=//p' minipacs.sh) \
    && npm pack --silent "@ohif/app@$version" >/dev/null \
    && tar -xzf "ohif-app-$version.tgz" --no-same-owner \
    && find package/dist -name '*.map' -delete \
    && echo "$version" > package/.minipacs-version

FROM debian:bookworm-slim
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends orthanc orthanc-python orthanc-dicomweb \
       python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
WORKDIR /opt/minipacs
COPY plugin/requirements.txt plugin/
RUN python3 -m venv .venv \
    && .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check -r plugin/requirements.txt \
    && find .venv -name '__pycache__' -prune -exec rm -rf {} +
COPY --from=ohif /build/package .ohif
COPY minipacs.sh orthanc.json ./
COPY docker/ docker/
COPY plugin/ plugin/

# Orthanc's storage and the minipacs index + PNGs: the only place written, kept across containers.
RUN mkdir -p /var/lib/minipacs && chown orthanc:orthanc /var/lib/minipacs
VOLUME /var/lib/minipacs
USER orthanc
EXPOSE 8042 4242
ENV MINIPACS_USER=minipacs MINIPACS_PASSWORD="" PYTHONDONTWRITEBYTECODE=1
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "docker/healthcheck.py"]
CMD ["./minipacs.sh", "serve", "docker/orthanc.json"]
