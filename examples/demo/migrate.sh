#!/bin/sh
# The demo's migration runner, what `[migrate] command` runs on one node
# with the new release (cutover gives it the release's environment: PGHOST,
# PGPORT, PGUSER, PGDATABASE from the spec, and CUTOVER_VERSION and
# CUTOVER_ROLLOUT). It applies migrations/*.sql in name order through psql,
# each file in one transaction together with its row in schema_migrations,
# so a file is applied whole or not at all, and once. Every run also leaves
# a row in migration_runs (version, rollout, start and end), which shows
# how often, and when, migrations ran. The first failing statement stops
# it with psql's error and a non-zero exit: cutover then fails the deploy
# before any node switched.
set -eu
cd "$(dirname "$0")"
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$@"; }

psql <<'SQL'
SET client_min_messages = warning;
CREATE TABLE IF NOT EXISTS schema_migrations (
  name text PRIMARY KEY,
  applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS migration_runs (
  id serial PRIMARY KEY,
  version text NOT NULL,
  rollout text NOT NULL,
  started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  finished_at timestamptz
);
SQL
run=$(psql -At -v version="${CUTOVER_VERSION:-manual}" -v rollout="${CUTOVER_ROLLOUT:-}" <<'SQL'
INSERT INTO migration_runs (version, rollout) VALUES (:'version', :'rollout') RETURNING id;
SQL
)
echo "migration run $run of ${CUTOVER_VERSION:-manual}"

for file in migrations/*.sql; do
  [ -e "$file" ] || continue
  name=$(basename "$file")
  applied=$(psql -At -v name="$name" <<'SQL'
SELECT count(*) FROM schema_migrations WHERE name = :'name';
SQL
)
  if [ "$applied" != 0 ]; then
    continue
  fi
  echo "applying $name"
  { cat "$file"; printf '\nINSERT INTO schema_migrations (name) VALUES (:%s);\n' "'name'"; } |
    psql --single-transaction -v name="$name" -f -
done

psql -v run="$run" <<'SQL'
UPDATE migration_runs SET finished_at = clock_timestamp() WHERE id = :run;
SQL
echo "migrations done"
