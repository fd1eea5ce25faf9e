//! A throw-away PostgreSQL cluster backed up by pgBackRest, for the
//! backup and restore tests: its data dir, server log, socket, pgBackRest
//! config, repository, locks and logs all in one temp dir of its own
//! (under /tmp, the cluster's OS user's), WAL archived to the repository
//! by `archive_command`, a stanza of its own. Nothing is shared with the
//! suite's cluster (`scripts/pg-env.sh`) or with another test. Stopped
//! (at once) and removed when dropped.
//!
//! PostgreSQL refuses to run as root: a test running as root runs the
//! server and pgbackrest as `postgres`; any other runs them as itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cutover_proto::v1 as pb;
use tempfile::TempDir;

/// Where Debian installs PostgreSQL's server binaries, a dir per major
/// version.
const DEBIAN_PG: &str = "/usr/lib/postgresql";
/// The superuser initdb creates, whoever runs the server.
pub const SUPERUSER: &str = "postgres";
const STANZA: &str = "cutover";

pub struct PgBackRestCluster {
    dir: TempDir,
    bin_dir: PathBuf,
    port: u16,
    os_user: String,
}

impl PgBackRestCluster {
    /// initdb, the config, the server started with archiving on, and the
    /// stanza created. Panics saying what is missing (scripts/test.sh
    /// installs PostgreSQL and pgBackRest).
    pub fn start() -> Self {
        let bin_dir = newest_pg_bin()
            .expect("PostgreSQL is missing: run ./scripts/test.sh (it installs Debian's postgresql), or install it");
        assert!(
            Command::new("pgbackrest").arg("version").output().is_ok_and(|o| o.status.success()),
            "pgbackrest is missing: run ./scripts/test.sh (it installs Debian's pgbackrest), or install it"
        );
        let root = nix::unistd::geteuid().is_root();
        let os_user = if root {
            SUPERUSER.to_string()
        } else {
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .expect("the test's own user has a name")
                .name
        };
        let dir = tempfile::Builder::new()
            .prefix("cutover-pgbr.")
            .tempdir_in("/tmp")
            .expect("a temp dir under /tmp");
        let cluster = Self {
            dir,
            bin_dir,
            port: free_port(),
            os_user,
        };
        cluster.own(cluster.dir());
        std::fs::write(cluster.config_path(), cluster.config())
            .expect("write the pgBackRest config");
        cluster.own(&cluster.config_path());
        let scratch = cluster.scratch_parent();
        std::fs::create_dir(&scratch).expect("create the scratch parent");
        cluster.own(&scratch);

        let data = cluster.data_dir();
        cluster.expect_ok(
            "initdb",
            &cluster.bin("initdb"),
            &[
                "-D",
                &path(&data),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        // In the data dir's own postgresql.conf, as a real cluster has
        // them: a drill's copy inherits them and must override them.
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             archive_mode = on\narchive_command = 'pgbackrest --config={config} --stanza={STANZA} archive-push %p'\n\
             fsync = off\n",
            port = cluster.port,
            dir = path(cluster.dir()),
            config = path(&cluster.config_path()),
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let log = path(&cluster.dir().join("server.log"));
        cluster.expect_ok(
            "pg_ctl start",
            &cluster.bin("pg_ctl"),
            &["-D", &path(&data), "-l", &log, "-w", "start"],
        );
        cluster.expect_ok(
            "pgbackrest stanza-create",
            "pgbackrest",
            &[
                &format!("--config={}", path(&cluster.config_path())),
                &format!("--stanza={STANZA}"),
                "stanza-create",
            ],
        );
        cluster
    }

    pub fn stanza(&self) -> &str {
        STANZA
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("pgbackrest.conf")
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.dir().join("repo")
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OS user the server and pgbackrest run as.
    pub fn os_user(&self) -> &str {
        &self.os_user
    }

    /// An empty dir the OS user owns, for drills' scratch copies.
    pub fn scratch_parent(&self) -> PathBuf {
        self.dir().join("scratch")
    }

    /// The stanza as a RunRecovery names it.
    pub fn target(&self) -> pb::PgBackRestTarget {
        pb::PgBackRestTarget {
            stanza: STANZA.into(),
            config_path: path(&self.config_path()),
            os_user: self.os_user.clone(),
            pg_bin_dir: path(&self.bin_dir),
            db_user: SUPERUSER.into(),
        }
    }

    /// `sql` in `database` through psql: rows a line each, values
    /// separated by `|`. Panics with psql's error.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|error| panic!("psql -c {sql:?} in {database} failed: {error}"))
    }

    pub fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let output = self.run(
            &self.bin("psql"),
            &[
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &path(self.dir()),
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
        );
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// pgbench against `database` as the superuser through the socket, as
    /// a command to run or spawn; `args` before the database name.
    pub fn pgbench(&self, database: &str, args: &[&str]) -> Command {
        let mut command = self.command(&self.bin("pgbench"));
        command
            .args([
                "-h",
                &path(self.dir()),
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(args)
            .arg(database);
        command
    }

    /// Closes the current WAL segment and waits until it is in the
    /// repository: what was committed before is then restorable by
    /// replaying the archive.
    pub fn archive_now(&self) {
        let segment = self.psql("postgres", "select pg_walfile_name(pg_switch_wal())");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let archived = self.psql(
                "postgres",
                "select coalesce(last_archived_wal, '') from pg_stat_archiver",
            );
            if archived.as_str() >= segment.as_str() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "WAL segment {segment} was not archived within 60 s (last archived: {archived:?}); server log:\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// pgbackrest with this cluster's config and stanza, as the OS user.
    pub fn pgbackrest(&self, args: &[&str]) -> Output {
        let mut all = vec![
            format!("--config={}", path(&self.config_path())),
            format!("--stanza={STANZA}"),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.run("pgbackrest", &all)
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default()
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn bin(&self, name: &str) -> String {
        path(&self.bin_dir.join(name))
    }

    fn config(&self) -> String {
        let dir = path(self.dir());
        format!(
            "[global]\nrepo1-path={dir}/repo\nrepo1-retention-full=99\nlog-path={dir}/log\n\
             lock-path={dir}/lock\nspool-path={dir}/spool\nlog-level-file=off\nstart-fast=y\n\n\
             [{STANZA}]\npg1-path={dir}/data\npg1-port={port}\npg1-socket-path={dir}\npg1-user={SUPERUSER}\n",
            port = self.port
        )
    }

    /// Runs `program args` as the OS user.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// `program` as the OS user runs it, in a dir it may enter.
    fn command(&self, program: &str) -> Command {
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", &self.os_user, "--", program]);
            c
        } else {
            Command::new(program)
        };
        command.current_dir(self.dir());
        command
    }

    fn expect_ok(&self, what: &str, program: &str, args: &[&str]) {
        let output = self.run(program, args);
        assert!(
            output.status.success(),
            "{what} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.server_log()
        );
    }

    fn own(&self, path: &Path) {
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name(&self.os_user)
                .ok()
                .flatten()
                .unwrap_or_else(|| {
                    panic!(
                        "no OS user {:?}: install postgresql (it creates it)",
                        self.os_user
                    )
                });
            std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
        }
    }
}

impl Drop for PgBackRestCluster {
    fn drop(&mut self) {
        // Not a panic in a drop: a failed test's own message matters more.
        // The temp dir goes after this, with everything in it.
        if self.data_dir().join("postmaster.pid").exists() {
            let data = path(&self.data_dir());
            let _ = self.run(
                &self.bin("pg_ctl"),
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            );
        }
    }
}

/// The newest /usr/lib/postgresql/VERSION/bin with an initdb.
pub fn newest_pg_bin() -> Option<PathBuf> {
    std::fs::read_dir(DEBIAN_PG)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
