#!/bin/sh
# Writes docker/.env from docker/.env.template, giving every empty setting of the template's
# secrets section a fresh random value (hex, URL-safe). Refuses to overwrite an existing file.
#   sh docker/make-env.sh docker/.env.template docker/.env      (`make cluster-env` runs this)
set -eu
template="${1:?usage: make-env.sh TEMPLATE OUTPUT}"
out="${2:?usage: make-env.sh TEMPLATE OUTPUT}"
if [ -e "$out" ]; then
    echo "make-env.sh: $out exists; not overwriting it (delete it to start over)" >&2
    exit 1
fi
random_hex() {
    od -An -N "$1" -tx1 /dev/urandom | tr -d ' \n'
}
umask 077
tmp="$out.tmp.$$"
section=""
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        "# --- secrets"*) section=secrets ;;
        "# --- "*) section=other ;;
    esac
    case "$line" in
        [A-Z]*=)
            if [ "$section" = secrets ]; then
                line="$line$(random_hex 24)"
            fi
            ;;
    esac
    printf '%s\n' "$line"
done <"$template" >"$tmp"
mv "$tmp" "$out"
echo "make-env.sh: wrote $out with new random secrets (keep it; it is git-ignored)" >&2
