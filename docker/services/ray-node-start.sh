# Sourced (not run) by ray-head.sh and ray-worker.sh once they have put their own
# `ray start ...` command in "$@": adds the flags both kinds of node take from the
# environment, then replaces the shell with the node.
if [ -n "${RAY_NODE_IP:-}" ]; then set -- "$@" --node-ip-address="$RAY_NODE_IP"; fi
if [ -n "${RAY_NUM_CPUS:-}" ]; then set -- "$@" --num-cpus="$RAY_NUM_CPUS"; fi
if [ -n "${RAY_NUM_GPUS:-}" ]; then set -- "$@" --num-gpus="$RAY_NUM_GPUS"; fi
if [ -n "${RAY_TEMP_DIR:-}" ]; then set -- "$@" --temp-dir="$RAY_TEMP_DIR"; fi
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags on purpose
if [ -n "${RAY_START_ARGS:-}" ]; then set -- "$@" $RAY_START_ARGS; fi
if [ "${RAY_BLOCK:-1}" = "1" ]; then set -- "$@" --block; fi
# Ray starts its workers at niceness 15; trials are the work of these nodes, so they run at
# full priority (as a local sweep's do) unless the environment says otherwise
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
exec "$@"
