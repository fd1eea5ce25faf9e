//! A real PostgreSQL for the migration tests: one throw-away server per
//! suite run, which `scripts/test.sh` starts (`scripts/pg-env.sh`), and a
//! database of its own for each test, so they run at once. The app they
//! deploy is the demo's (`examples/demo`): its migration runner
//! (`migrate.sh`, SQL files through psql) and a health check that reads
//! the database.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The demo app and its migration runner, as a release ships them.
const APP: &str = include_str!("../../examples/demo/app.py");
const PGWIRE: &str = include_str!("../../examples/demo/pgwire.py");
const MIGRATE: &str = include_str!("../../examples/demo/migrate.sh");

/// A database of the test server, dropped (whoever is still connected)
/// when this is.
pub struct TestDb {
    pub name: String,
    host: String,
    port: String,
    user: String,
}

impl TestDb {
    /// Creates a database named after `prefix` (lowercase letters and `_`)
    /// and a random suffix. A test run without the server (plain `cargo
    /// test`) fails here, saying how to get one.
    pub fn create(prefix: &str) -> Self {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run the tests with ./scripts/test.sh, which starts a throw-away PostgreSQL (scripts/pg-env.sh)")
            })
        };
        let address = var("CUTOVER_TEST_PG");
        let (host, port) = address
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("CUTOVER_TEST_PG={address:?} is not HOST:PORT"));
        let db = Self {
            name: format!("cutover_{prefix}_{:08x}", rand::random::<u32>()),
            host: host.to_string(),
            port: port.to_string(),
            user: var("CUTOVER_TEST_PG_USER"),
        };
        let create = format!("CREATE DATABASE {}", db.name);
        if let Err(error) = db.psql("postgres", &create) {
            panic!("{create} on {address} failed: {error}");
        }
        db
    }

    /// Runs `sql` in this database through psql: rows a line each, values
    /// separated by `|`. Panics with psql's error.
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|error| panic!("psql -c {sql:?} on {} failed: {error}", self.name))
    }

    /// The same, psql's error as the error: for polling a table that a
    /// migration has yet to create.
    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        self.psql(&self.name, sql)
    }

    /// The rows of `sql`, each split into its values.
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        self.query(sql)
            .lines()
            .map(|line| line.split('|').map(str::to_string).collect())
            .collect()
    }

    fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let output = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host, "-p", &self.port, "-U", &self.user])
            .args(["-d", database, "-c", sql])
            .output()
            .expect("run psql (scripts/pg-env.sh puts it on PATH)");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// The environment a release needs to reach this database, as the
    /// lines of a spec's env table: what psql and the app read.
    pub fn spec_env(&self) -> String {
        format!(
            "PGHOST = {:?}\nPGPORT = {:?}\nPGUSER = {:?}\nPGDATABASE = {:?}\n",
            self.host, self.port, self.user, self.name
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Not a panic in a drop: a failed test's own message matters more.
        let _ = Command::new("psql")
            .args([
                "-X", "-q", "-h", &self.host, "-p", &self.port, "-U", &self.user,
            ])
            .args(["-d", "postgres", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .output();
    }
}

/// A release of the demo app with a database: VERSION `version`, a health
/// check that runs `query` (the code's use of the schema), and
/// `migrations` (file name, SQL) for `sh migrate.sh` to apply. Written as
/// `dir/demo-VERSION.tar.gz`; returns its path.
pub fn db_app_archive(
    dir: &Path,
    version: &str,
    query: &str,
    migrations: &[(&str, &str)],
) -> PathBuf {
    let names: Vec<String> = migrations
        .iter()
        .map(|(name, _)| format!("migrations/{name}"))
        .collect();
    let version_file = format!("{version}\n");
    let mut files = vec![
        ("app.py", APP),
        ("pgwire.py", PGWIRE),
        ("migrate.sh", MIGRATE),
        ("VERSION", version_file.as_str()),
        ("QUERY", query),
    ];
    files.extend(
        names
            .iter()
            .zip(migrations)
            .map(|(name, (_, sql))| (name.as_str(), *sql)),
    );
    crate::archive(dir, &format!("demo-{version}.tar.gz"), &files)
}
