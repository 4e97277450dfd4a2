# minipacs: Orthanc + the minipacs plugin, from Debian's packages, running as Debian's `orthanc` user.
#   docker build -t minipacs .
#   docker run -p 8042:8042 -p 4242:4242 -e MINIPACS_PASSWORD=... -v minipacs:/var/lib/minipacs minipacs
# Build stages fetch OHIF (Node.js stays out of the image) and build the plugin's venv (pip stays
# out; stripping its shared objects breaks numpy's); the image's layers go from the least to the most often changed, so a code
# change rebuilds only the last ones.

FROM debian:bookworm-slim AS ohif
RUN apt-get update -q && apt-get install -y -q --no-install-recommends nodejs npm ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY minipacs.sh ./
# The version minipacs.sh pins. Left out: source maps (38 MB, for debugging OHIF itself) and
# ONNX Runtime Web (108 MB, for OHIF's optional AI segmentation tools).
RUN version=$(sed -n 's/^OHIF_VERSION=//p' minipacs.sh) \
    && npm pack --silent "@ohif/app@$version" >/dev/null \
    && tar -xzf "ohif-app-$version.tgz" --no-same-owner \
    && find package/dist -name '*.map' -delete && rm -rf package/dist/ort \
    && echo "$version" > package/.minipacs-version

FROM debian:bookworm-slim AS venv
RUN apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/minipacs
COPY plugin/requirements.txt plugin/
RUN python3 -m venv .venv \
    && .venv/bin/pip install -q --no-cache-dir --disable-pip-version-check -r plugin/requirements.txt \
    && .venv/bin/pip uninstall -q -y pip setuptools \
    && find .venv -name '__pycache__' -prune -exec rm -rf {} +

FROM debian:bookworm-slim
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends orthanc orthanc-python orthanc-dicomweb \
       python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
       /usr/share/locale/*
WORKDIR /opt/minipacs
COPY --from=venv /opt/minipacs/.venv .venv
COPY --from=ohif /build/package/dist .ohif/dist
COPY --from=ohif /build/package/.minipacs-version .ohif/
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
