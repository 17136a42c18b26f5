#!/usr/bin/env bash
# Install (if needed) and start PostgreSQL on 127.0.0.1, create a role for the tests with a
# random password (made once per machine), and print the URI for DUOSPARSE_TEST_POSTGRES_URI.
set -euo pipefail
bash "$(dirname "$0")/system-packages.sh" >&2
read -r version cluster _ < <(pg_lsclusters -h | head -n 1)
pg_ctlcluster "$version" "$cluster" start >/dev/null 2>&1 || true  # already running is fine
for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -q && break; sleep 1; done
# One random password per machine, kept in a private file, so that concurrent runs agree.
secret_file="${XDG_CACHE_HOME:-$HOME/.cache}/duosparse/postgres-test-password"
if [ ! -s "$secret_file" ]; then
  mkdir -p "$(dirname "$secret_file")"
  (umask 077; python3 -c 'import secrets; print(secrets.token_hex(16))' > "$secret_file")
fi
password=$(cat "$secret_file")
su postgres -c "psql -q -v ON_ERROR_STOP=1" >&2 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'duosparse_test') THEN
    CREATE ROLE duosparse_test LOGIN CREATEDB;
  END IF;
END \$\$;
ALTER ROLE duosparse_test PASSWORD '$password';
SQL
echo "postgresql://duosparse_test:$password@127.0.0.1:5432/postgres"
