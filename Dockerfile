# minipacs: Orthanc + the minipacs plugin, installed by the same script as on a workstation.
#   docker build -t minipacs .
#   docker run -p 8042:8042 -p 4242:4242 -e MINIPACS_PASSWORD=... -v minipacs:/var/lib/minipacs minipacs
FROM debian:bookworm-slim

WORKDIR /opt/minipacs
COPY minipacs.sh orthanc.json ./
COPY plugin/ plugin/
RUN ./minipacs.sh setup && rm -rf /var/lib/apt/lists/* /root/.cache
COPY docker/ docker/

# Orthanc's storage and the minipacs index + PNGs: keep them across containers.
VOLUME /var/lib/minipacs
EXPOSE 8042 4242
ENV MINIPACS_USER=minipacs MINIPACS_PASSWORD=""
CMD ["./minipacs.sh", "start", "docker/orthanc.json"]
