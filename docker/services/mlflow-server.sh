#!/bin/sh
# The MLflow tracking server: runs and users in PostgreSQL, artifacts in an S3-compatible store
# (proxied, so clients need no S3 credentials), HTTP basic authentication on every request, and
# a Host-header allow-list. docker/compose.yaml runs this script as the mlflow service;
# tests/test_deployment.py runs the same script on 127.0.0.1.
#
# Environment (required ones have no default that works):
#   MLFLOW_BACKEND_STORE_URI       required: postgresql+psycopg://USER:PASSWORD@HOST:5432/DB
#   MLFLOW_AUTH_DB_URI             required: the users/permissions database (its own database)
#   MLFLOW_ARTIFACTS_DESTINATION   required: s3://BUCKET[/PREFIX]; the bucket is created if missing
#   MLFLOW_S3_ENDPOINT_URL         the S3-compatible endpoint (http://object-store:9000); unset = AWS
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   the object store's credentials
#   MLFLOW_AUTH_ADMIN_USERNAME     the admin user created on first start (admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD     required on first start: MLflow ships no default password
#   MLFLOW_FLASK_SERVER_SECRET_KEY required: signs the UI's CSRF tokens (same on every worker)
#   MLFLOW_AUTH_DEFAULT_PERMISSION what signed-in users may do with others' experiments (READ)
#   MLFLOW_HOST, MLFLOW_PORT       bind address and port (127.0.0.1, 5000; compose: 0.0.0.0
#                                  inside the container, published on the host's 127.0.0.1)
#   MLFLOW_ALLOWED_HOSTS           Host headers accepted, comma-separated, wildcards allowed
#                                  (localhost:PORT,127.0.0.1:PORT)
#   MLFLOW_WORKERS                 server worker processes (2)
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?mlflow-server.sh: set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg://...)}"
: "${MLFLOW_AUTH_DB_URI:?mlflow-server.sh: set MLFLOW_AUTH_DB_URI (postgresql+psycopg://.../mlflow_auth)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?mlflow-server.sh: set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?mlflow-server.sh: set MLFLOW_AUTH_ADMIN_PASSWORD (MLflow has no default)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?mlflow-server.sh: set MLFLOW_FLASK_SERVER_SECRET_KEY (random, 32+ chars)}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
case "$MLFLOW_BACKEND_STORE_URI" in
    sqlite:* | file:* | /* | ./*)
        echo "mlflow-server.sh: '$MLFLOW_BACKEND_STORE_URI' is a local store; a shared server" \
            "needs PostgreSQL (SQLite locks up under parallel writers)." >&2
        exit 2
        ;;
esac

# The auth app reads its settings from an ini file; write one (readable by this user only) with
# the database URI from the environment. configparser treats '%' as interpolation: double it.
umask 077
config_dir="$(mktemp -d)"
auth_db_uri="$(printf '%s' "$MLFLOW_AUTH_DB_URI" | sed 's/%/%%/g')"
cat >"$config_dir/basic_auth.ini" <<EOF
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $auth_db_uri
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"

# MLflow does not create buckets: make sure the artifact bucket exists (waits for the store).
case "$MLFLOW_ARTIFACTS_DESTINATION" in
    s3://*)
        python3 - <<'EOF'
import os
import sys
import time
from urllib.parse import urlparse

import boto3
from botocore.exceptions import BotoCoreError, ClientError

bucket = urlparse(os.environ["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
deadline = time.monotonic() + float(os.environ.get("MLFLOW_BUCKET_WAIT_S", "120"))
while True:
    try:
        s3.head_bucket(Bucket=bucket)
        break
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            s3.create_bucket(Bucket=bucket)
            print(f"mlflow-server.sh: created bucket {bucket}", file=sys.stderr)
            break
        error = e
    except BotoCoreError as e:  # not up yet
        error = e
    if time.monotonic() > deadline:
        sys.exit(f"mlflow-server.sh: the object store does not answer for bucket {bucket}: {error}")
    time.sleep(1)
EOF
        ;;
esac

# The store URIs hold passwords: mlflow reads MLFLOW_BACKEND_STORE_URI from the environment, so
# it stays out of the process list.
export MLFLOW_BACKEND_STORE_URI
exec mlflow server \
    --app-name basic-auth \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "$host" \
    --port "$port" \
    --workers "${MLFLOW_WORKERS:-2}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:$port,127.0.0.1:$port}"
