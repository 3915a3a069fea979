#!/usr/bin/env bash
# Starts a local PostgreSQL (Debian's package) with a `treadle` database for the Postgres store tests, and
# prints its SQLAlchemy URL. Best effort: exits non-zero (and CI skips those tests) if it cannot be had.
set -eu
URL="postgresql+psycopg://treadle:treadle@127.0.0.1/treadle"
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || exit 1
  timeout 300 apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq postgresql >/dev/null 2>&1
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
[ -d "/etc/postgresql/$version/main" ] || pg_createcluster "$version" main >/dev/null
pg_ctlcluster "$version" main start >/dev/null 2>&1 || pg_ctlcluster "$version" main status >/dev/null
for _ in $(seq 30); do su postgres -c "pg_isready -q" && break; sleep 1; done
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='treadle'\"" | grep -q 1 ||
  su postgres -c "psql -q -c \"CREATE USER treadle PASSWORD 'treadle' SUPERUSER\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='treadle'\"" | grep -q 1 ||
  su postgres -c "createdb -O treadle treadle"
echo "$URL"
