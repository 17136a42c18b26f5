#!/bin/sh
# Creates MLflow's second database, the one for users and permissions (basic auth), beside the
# tracking database POSTGRES_DB. docker/compose.yaml mounts this script into the postgres image's
# /docker-entrypoint-initdb.d/, which runs it once, on an empty data volume; the test runs it
# against its own PostgreSQL (with PGHOST, PGPORT and PGPASSWORD set).
#
# Environment: POSTGRES_USER, POSTGRES_DB (both set by the postgres image), MLFLOW_AUTH_DB.
set -eu
: "${MLFLOW_AUTH_DB:?postgres-init.sh: set MLFLOW_AUTH_DB, the name of the auth database}"
psql -v ON_ERROR_STOP=1 -v auth_db="$MLFLOW_AUTH_DB" \
    --username "${POSTGRES_USER:?}" --dbname "${POSTGRES_DB:?}" <<'SQL'
CREATE DATABASE :"auth_db";
SQL
