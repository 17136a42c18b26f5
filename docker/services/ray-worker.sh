#!/bin/sh
# A Ray worker node that joins the head at RAY_HEAD_ADDRESS and runs trials. docker/compose.yaml
# runs this script as the (scalable) ray-worker service; tests/test_deployment.py runs the same
# script on 127.0.0.1.
#
# Environment:
#   RAY_AUTH_MODE=token, RAY_AUTH_TOKEN   required, the head's token
#   RAY_HEAD_ADDRESS      required: HOST:PORT of the head's GCS (compose: ray-head:6379)
#   RAY_NODE_IP           this node's address (default: Ray picks the container's address)
#   RAY_NUM_CPUS, RAY_NUM_GPUS   resources offered to trials (default: what Ray detects)
#   RAY_TEMP_DIR          Ray's session folder on this node (default /tmp/ray)
#   RAY_START_ARGS        further `ray start` flags, split on spaces
#   RAY_BLOCK             1 (default): stay in the foreground; SIGTERM stops the node
# Passed through to trials, as on the head: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,
# MLFLOW_TRACKING_PASSWORD, DUOSPARSE_TUNE_STORAGE, DUOSPARSE_DATA_DIR.
set -eu

if [ "${RAY_AUTH_MODE:-}" != "token" ] || [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    echo "ray-worker.sh: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the head's token." >&2
    exit 2
fi
: "${RAY_HEAD_ADDRESS:?ray-worker.sh: set RAY_HEAD_ADDRESS to the head GCS address, HOST:PORT}"

set -- ray start --address="$RAY_HEAD_ADDRESS" --disable-usage-stats
# shellcheck source=ray-node-start.sh
. "$(dirname "$0")/ray-node-start.sh"
