#!/bin/sh
# The Ray head node: GCS, dashboard (the `ray job submit` endpoint) and, with RAY_NUM_CPUS > 0,
# trials. One place for the command: docker/compose.yaml runs this script as the ray-head
# service, and tests/test_deployment.py runs the same script on 127.0.0.1.
#
# Environment (everything comes from here; nothing is read from files):
#   RAY_AUTH_MODE=token, RAY_AUTH_TOKEN   required: Ray's token authentication (Ray >= 2.52);
#                                         the same token on every node and every client
#   RAY_GCS_PORT          GCS port (6379)
#   RAY_DASHBOARD_HOST    interface of the dashboard / job API (127.0.0.1; compose: 0.0.0.0
#                         inside the container, published on the host's 127.0.0.1 only)
#   RAY_DASHBOARD_PORT    dashboard / job API port (8265)
#   RAY_NODE_IP           this node's address (default: Ray picks the container's address)
#   RAY_NUM_CPUS, RAY_NUM_GPUS   resources offered to trials (default: what Ray detects)
#   RAY_TEMP_DIR          Ray's session folder (default /tmp/ray)
#   RAY_START_ARGS        further `ray start` flags, split on spaces (e.g. fixed agent ports)
#   RAY_BLOCK             1 (default): stay in the foreground, as a container's main process
#                         must; stopping this process (SIGTERM) stops the node
# What trials need is passed through the environment to every Ray worker process:
#   MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD  (MLflow server)
#   DUOSPARSE_TUNE_STORAGE   Tune's storage_path: a folder every node sees (shared volume/NFS)
#   DUOSPARSE_DATA_DIR       where the corpora are on every node
set -eu

if [ "${RAY_AUTH_MODE:-}" != "token" ] || [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    echo "ray-head.sh: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (e.g. openssl rand -hex 32;" \
        "the same value on every node and client). A Ray cluster without it runs any code" \
        "that reaches its ports." >&2
    exit 2
fi
case "${MLFLOW_TRACKING_URI:-}" in
    http://* | https://*) ;;
    *)
        echo "ray-head.sh: MLFLOW_TRACKING_URI must be the http(s) URL of an MLflow server that" \
            "every node reaches (got '${MLFLOW_TRACKING_URI:-}'); a SQLite file or local folder" \
            "exists on one machine only." >&2
        exit 2
        ;;
esac
if [ -z "${DUOSPARSE_TUNE_STORAGE:-}" ]; then
    echo "ray-head.sh: warning: DUOSPARSE_TUNE_STORAGE is not set; on more than one machine" \
        "Ray Tune needs a storage_path that every node sees (shared volume, NFS or s3://)." >&2
fi

set -- ray start --head \
    --port="${RAY_GCS_PORT:-6379}" \
    --include-dashboard=true \
    --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}" \
    --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
    --disable-usage-stats
# shellcheck source=ray-node-start.sh
. "$(dirname "$0")/ray-node-start.sh"
