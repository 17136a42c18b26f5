#!/bin/sh
# The S3-compatible object store for MLflow's artifacts. docker/compose.yaml runs this script in
# the MinIO image (OBJECT_STORE_IMPL=minio, data on a volume); tests/test_deployment.py runs the
# same script with OBJECT_STORE_IMPL=moto, moto's S3 server from PyPI, since MinIO ships no
# Python package. moto keeps objects in memory and accepts any key: a stand-in for tests only.
#
# Environment:
#   OBJECT_STORE_IMPL       required: minio | moto
#   OBJECT_STORE_HOST       bind address (127.0.0.1; compose: 0.0.0.0 inside the container)
#   OBJECT_STORE_PORT       S3 API port (9000)
#   OBJECT_STORE_DATA_DIR   minio: where objects live (/data)
#   OBJECT_STORE_CONSOLE_PORT   minio: the web console's port (9001), on the same address
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   minio: required, the root credentials
set -eu

host="${OBJECT_STORE_HOST:-127.0.0.1}"
port="${OBJECT_STORE_PORT:-9000}"
case "${OBJECT_STORE_IMPL:-}" in
    minio)
        : "${AWS_ACCESS_KEY_ID:?object-store.sh: set AWS_ACCESS_KEY_ID (the S3 access key)}"
        : "${AWS_SECRET_ACCESS_KEY:?object-store.sh: set AWS_SECRET_ACCESS_KEY (8+ characters)}"
        export MINIO_ROOT_USER="$AWS_ACCESS_KEY_ID" MINIO_ROOT_PASSWORD="$AWS_SECRET_ACCESS_KEY"
        exec minio server "${OBJECT_STORE_DATA_DIR:-/data}" \
            --address "$host:$port" \
            --console-address "$host:${OBJECT_STORE_CONSOLE_PORT:-9001}"
        ;;
    moto)
        exec moto_server --host "$host" --port "$port"
        ;;
    *)
        echo "object-store.sh: set OBJECT_STORE_IMPL to minio (a real store) or moto (tests)" >&2
        exit 2
        ;;
esac
