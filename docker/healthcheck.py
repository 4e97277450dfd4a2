"""The image's HEALTHCHECK: healthy when minipacs answers inside Orthanc (stdlib only: the image
has no curl). Authenticates as $MINIPACS_USER, as docker/orthanc.json registers that user."""

import base64
import os
import sys
import urllib.request

request = urllib.request.Request("http://127.0.0.1:8042/minipacs/ingest")
user, password = os.environ.get("MINIPACS_USER", ""), os.environ.get("MINIPACS_PASSWORD", "")
token = base64.b64encode(f"{user}:{password}".encode()).decode()
request.add_header("Authorization", f"Basic {token}")
try:
    with urllib.request.urlopen(request, timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception as error:  # not up yet, or minipacs answers 503 (it could not start)
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
