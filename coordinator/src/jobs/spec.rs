//! The spec's `[jobs.NAME]`: commands the agents run on a schedule, checked
//! in full with the rest of the spec, and turned into the definition an
//! environment stores (`JobDef`) by `cutover jobs apply`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::cron::Cron;
use crate::spec::{AppSpec, SpecError};
use crate::spec_checks;
use crate::store::{Concurrency, JobDef, JobKind, RunOn, Schedule};

const MIN_EVERY: Duration = Duration::from_secs(1);
const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest RPO, RTO or backup age a spec may give: longer is a typo.
const MAX_TARGET: Duration = Duration::from_secs(366 * 24 * 3600);
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Jobs one spec may define.
pub const MAX_JOBS: usize = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// "job" (default), "backup" or "restore_test".
    #[serde(default)]
    pub kind: JobKind,
    /// Run with this service's current release (files, environment,
    /// secrets); left out: a plain command on the node.
    #[serde(default)]
    pub service: Option<String>,
    /// What runs; or `pgbackrest`.
    #[serde(default)]
    pub command: Vec<String>,
    /// A backup or restore drill of PostgreSQL run by the agent with
    /// pgBackRest, instead of a command.
    #[serde(default)]
    pub pgbackrest: Option<crate::pgbackrest::PgBackrestSpec>,
    /// A pgBackRest drill's checks of the restored copy.
    #[serde(default)]
    pub verify: Vec<crate::pgbackrest::VerifySpec>,
    /// Crontab syntax, e.g. "*/15 * * * *"; or `every`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The zone `schedule` is read in (tz database name); default "UTC".
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    #[serde(default)]
    pub run_on: RunOn,
    /// ANDed with the environment's selector (and the service's).
    #[serde(default)]
    pub nodes: BTreeMap<String, String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub concurrency: Concurrency,
    /// Added to the command's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The environments that have this job; left out: every one.
    #[serde(default)]
    pub environments: Option<Vec<String>>,
    /// Backups and restore drills: the data set they are of.
    #[serde(default)]
    pub dataset: Option<String>,
    /// Backups: the most data (as time) the shop may lose.
    #[serde(default, with = "humantime_serde")]
    pub rpo: Option<Duration>,
    /// Restore drills: how long a restore may take.
    #[serde(default, with = "humantime_serde")]
    pub rto: Option<Duration>,
    /// Restore drills: may run in a production environment. A drill
    /// restores into a scratch copy, but on a production node it competes
    /// with the shop for disk and I/O.
    #[serde(default)]
    pub allow_production: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(600)
}

impl JobSpec {
    /// Checks one job against the spec; errors are (key under the job,
    /// message).
    pub fn check(&self, spec: &AppSpec) -> Result<(), (String, String)> {
        if let Some(service) = &self.service {
            let services: Vec<&String> = spec.services.keys().collect();
            spec_checks::known_service(service, &services)?;
            if spec.services[service].runtime == "docker" {
                return Err((
                    "service".into(),
                    format!("jobs run as processes in the release's dir, and service {service} runs as a docker container; give a plain command (no service), or a process service"),
                ));
            }
        }
        match (&self.pgbackrest, spec_checks::is_empty(&self.command)) {
            (None, true) => return Err((
                "command".into(),
                "no command to run; give the program and its arguments, e.g. [\"php\", \"artisan\", \"schedule:run\"], or a [pgbackrest] table".into(),
            )),
            (Some(_), false) => return Err(("command".into(), "give a command or a [pgbackrest] table, not both".into())),
            (Some(pgbackrest), true) => {
                if self.kind == JobKind::Job {
                    return Err(("pgbackrest".into(), "only a backup or a restore drill runs pgBackRest; add kind = \"backup\" or \"restore_test\"".into()));
                }
                if self.service.is_some() {
                    return Err(("service".into(), "a pgBackRest job runs on the database node, with no release; remove service".into()));
                }
                crate::pgbackrest::check(pgbackrest, self.kind == JobKind::RestoreTest, &self.verify)?;
            }
            (None, false) => {}
        }
        if !self.verify.is_empty()
            && (self.pgbackrest.is_none() || self.kind != JobKind::RestoreTest)
        {
            return Err(("verify".into(), "only a restore drill run with [pgbackrest] has checks; a command drill checks the copy itself and exits non-zero when one fails".into()));
        }
        self.schedule()?;
        if self.timeout < Duration::from_secs(1) || self.timeout > MAX_TIMEOUT {
            return Err((
                "timeout".into(),
                format!(
                    "{} is outside 1s to 24h",
                    humantime::format_duration(self.timeout)
                ),
            ));
        }
        spec_checks::env_vars(&self.env).map_err(|(k, m)| (format!("env.{k}"), m))?;
        if let Some(envs) = &self.environments {
            if let Some(unknown) = envs.iter().find(|e| !spec.environments.contains_key(*e)) {
                return Err((
                    "environments".into(),
                    format!(
                        "names {unknown:?}, which is not an environment; the spec defines {}",
                        spec.environments
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
        self.check_recovery(spec)
    }

    /// The keys of backups and drills: a data set, and targets only where
    /// they mean something.
    fn check_recovery(&self, spec: &AppSpec) -> Result<(), (String, String)> {
        let kind = self.kind.as_str();
        match (self.kind, &self.dataset) {
            (JobKind::Job, Some(_)) => {
                return Err((
                    "dataset".into(),
                    "only a backup or a restore drill is of a data set; add kind = \"backup\" or \"restore_test\", or remove it".into(),
                ))
            }
            (JobKind::Backup | JobKind::RestoreTest, None) => {
                return Err((
                    "dataset".into(),
                    format!("a {kind} job names the data set it is of, e.g. dataset = \"shop-db\""),
                ))
            }
            (_, Some(dataset)) => crate::spec::name_ok(dataset).map_err(|m| ("dataset".to_string(), m))?,
            (JobKind::Job, None) => {}
        }
        for (key, target) in [("rpo", self.rpo), ("rto", self.rto)] {
            if let Some(target) = target.filter(|t| *t > MAX_TARGET || t.is_zero()) {
                return Err((
                    key.into(),
                    format!(
                        "{} is outside 1s to a year",
                        humantime::format_duration(target)
                    ),
                ));
            }
        }
        if self.rpo.is_some() && self.kind != JobKind::Backup {
            return Err((
                "rpo".into(),
                format!("a {kind} job has no recovery point; set rpo on the data set's backup job"),
            ));
        }
        if self.rto.is_some() && self.kind != JobKind::RestoreTest {
            return Err((
                "rto".into(),
                format!(
                    "a {kind} job has no recovery time; set rto on the data set's restore_test job"
                ),
            ));
        }
        if self.allow_production && self.kind != JobKind::RestoreTest {
            return Err((
                "allow_production".into(),
                "only a restore_test job can be kept out of production; remove it".into(),
            ));
        }
        if self.kind == JobKind::RestoreTest && !self.allow_production {
            let production: Vec<&String> = self
                .environment_names(spec)
                .into_iter()
                .filter(|e| is_production(e))
                .collect();
            if let Some(env) = production.first() {
                return Err((
                    "environments".into(),
                    format!("the restore drill would run in {env}, a production environment; restore into a non-production one (environments = [\"staging\"]), or set allow_production = true"),
                ));
            }
        }
        Ok(())
    }

    fn environment_names<'a>(&'a self, spec: &'a AppSpec) -> Vec<&'a String> {
        match &self.environments {
            Some(envs) => envs.iter().collect(),
            None => spec.environments.keys().collect(),
        }
    }

    fn schedule(&self) -> Result<Schedule, (String, String)> {
        match (&self.schedule, self.every) {
            (Some(expression), None) => {
                let cron = Cron::parse(expression).map_err(|m| ("schedule".to_string(), m))?;
                let timezone = self.timezone.clone().unwrap_or_else(|| "UTC".into());
                let tz = jiff::tz::TimeZone::get(&timezone).map_err(|e| {
                    ("timezone".to_string(), format!("{timezone:?} is not a zone of this machine's tz database ({e}); use a name such as \"Europe/Berlin\", or install tzdata"))
                })?;
                if cron.next_after(jiff::Timestamp::now(), &tz).is_none() {
                    return Err(("schedule".into(), format!("{expression:?} never fires (no such date within 8 years)")));
                }
                Ok(Schedule::Cron { expression: expression.clone(), timezone })
            }
            (None, Some(every)) => {
                if self.timezone.is_some() {
                    return Err(("timezone".into(), "only a cron schedule has a zone; remove it, or use schedule".into()));
                }
                if every > MAX_EVERY {
                    return Err(("every".into(), format!("{} is over the one-year maximum; use a cron schedule", humantime::format_duration(every))));
                }
                if every < MIN_EVERY {
                    return Err(("every".into(), format!("{} is under the 1s minimum", humantime::format_duration(every))));
                }
                Ok(Schedule::Every { every_ms: every.as_millis() as u64 })
            }
            (Some(_), Some(_)) => Err(("every".into(), "give schedule or every, not both".into())),
            (None, None) => Err((String::new(), "has no schedule; add schedule = \"CRON\" (e.g. \"*/15 * * * *\") or every = \"1m\"".into())),
        }
    }
}

/// Whether an environment holds the shop's real data by its name.
pub fn is_production(env: &str) -> bool {
    matches!(env, "production" | "prod")
}

/// A backup gate (`require_backup`) must name a data set one of the
/// spec's backup jobs backs up: in environment `env` for an environment's
/// gate, in some environment for the migration's (checked again against
/// the deploy's environment when it runs).
pub fn check_gate(
    spec: &AppSpec,
    gate: &super::recovery::RequireBackup,
    env: Option<&str>,
) -> Result<(), (String, String)> {
    if gate.max_age.is_zero() || gate.max_age > MAX_TARGET {
        return Err((
            "max_age".into(),
            format!(
                "{} is outside 1s to a year",
                humantime::format_duration(gate.max_age)
            ),
        ));
    }
    let backed_up: Vec<&String> = spec
        .jobs
        .values()
        .filter(|j| j.kind == JobKind::Backup)
        .filter(|j| env.is_none_or(|e| j.environment_names(spec).iter().any(|n| *n == e)))
        .filter_map(|j| j.dataset.as_ref())
        .collect();
    if backed_up.contains(&&gate.dataset) {
        return Ok(());
    }
    let place = env.map(|e| format!(" in {e}")).unwrap_or_default();
    Err((
        "dataset".into(),
        match backed_up.is_empty() {
            true => format!("{:?} is not backed up by any job of this spec{place}; add a [jobs.NAME] with kind = \"backup\" and dataset = {:?}", gate.dataset, gate.dataset),
            false => format!(
                "{:?} is not backed up by any job of this spec{place}; the backed-up data sets are {}",
                gate.dataset,
                backed_up.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(", ")
            ),
        },
    ))
}

/// Checks every job of a spec.
pub fn check_all(spec: &AppSpec) -> Result<(), (String, String)> {
    if spec.jobs.len() > MAX_JOBS {
        return Err((
            "jobs".into(),
            format!("{} jobs, over the limit of {MAX_JOBS}", spec.jobs.len()),
        ));
    }
    for (name, job) in &spec.jobs {
        let key = format!("jobs.{name}");
        crate::spec::name_ok(name).map_err(|m| (key.clone(), m))?;
        job.check(spec).map_err(|(k, m)| {
            (
                if k.is_empty() {
                    key.clone()
                } else {
                    format!("{key}.{k}")
                },
                m,
            )
        })?;
    }
    Ok(())
}

/// The jobs environment `env` has, as it stores them; `now_ms` and `by`
/// say when and by whom. The spec was checked when it was parsed.
pub fn resolve(
    spec: &AppSpec,
    file: &str,
    env: &str,
    now_ms: i64,
    by: &str,
) -> Result<Vec<JobDef>, SpecError> {
    let environment = spec.environment(file, env)?;
    let mut defs = Vec::new();
    for (name, job) in &spec.jobs {
        if !job.environment_names(spec).iter().any(|e| *e == env) {
            continue;
        }
        let error = |key: String, message: String| SpecError {
            file: file.into(),
            key,
            message,
        };
        let schedule = job
            .schedule()
            .map_err(|(k, m)| error(format!("jobs.{name}.{k}"), m))?;
        let mut selector = environment.nodes.clone();
        let service_nodes = job
            .service
            .as_ref()
            .map(|s| spec.services[s].nodes.clone())
            .unwrap_or_default();
        for (from, nodes) in [("service", &service_nodes), ("job", &job.nodes)] {
            for (k, v) in nodes {
                if let Some(existing) = selector.get(k).filter(|e| *e != v) {
                    return Err(error(
                        format!("jobs.{name}.nodes.{k}"),
                        format!("the {from} selects {k}={v} but the rest selects {k}={existing} in {env}; no node can match both"),
                    ));
                }
                selector.insert(k.clone(), v.clone());
            }
        }
        defs.push(JobDef {
            app: spec.app.clone(),
            env: env.to_string(),
            name: name.clone(),
            kind: job.kind,
            service: job.service.clone(),
            command: job.command.clone(),
            vars: job.env.clone(),
            schedule,
            run_on: job.run_on,
            selector,
            timeout_ms: job.timeout.as_millis() as u64,
            concurrency: job.concurrency,
            dataset: job.dataset.clone(),
            rpo_ms: job.rpo.map(|d| d.as_millis() as u64),
            rto_ms: job.rto.map(|d| d.as_millis() as u64),
            applied_at_ms: now_ms,
            applied_by: by.to_string(),
            last_tick_ms: now_ms,
            paused: false,
            pgbackrest: job.pgbackrest.clone(),
            verify: job.verify.clone(),
        });
    }
    Ok(defs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
app = "shop"
[services.web]
command = ["php", "artisan", "octane:start"]
listen = ":8080"
nodes = { role = "web" }
[services.web.health]
path = "/up"
[environments.staging]
nodes = { env = "staging" }
[environments.production]
nodes = { env = "production" }
"#;

    fn parse(jobs: &str) -> Result<AppSpec, SpecError> {
        AppSpec::parse(&format!("{BASE}{jobs}"), "cutover.toml")
    }

    fn refused(jobs: &str) -> String {
        parse(jobs).unwrap_err().to_string()
    }

    #[test]
    fn the_issue_example_resolves_per_environment() {
        let spec = parse(
            r#"
[jobs.scheduler]
service = "web"
command = ["php", "artisan", "schedule:run"]
schedule = "* * * * *"
run_on = "one"
nodes = { role = "web" }
timeout = "10m"
concurrency = "forbid"

[jobs.db-backup]
kind = "backup"
dataset = "shop-db"
rpo = "15m"
command = ["backup.sh"]
every = "5m"
environments = ["production"]
nodes = { role = "db" }

[jobs.drill]
kind = "restore_test"
dataset = "shop-db"
rto = "1h"
command = ["drill.sh"]
schedule = "0 4 * * *"
timezone = "Europe/Berlin"
environments = ["staging"]
"#,
        )
        .unwrap();
        let prod = resolve(&spec, "cutover.toml", "production", 1000, "ops").unwrap();
        let names: Vec<&str> = prod.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["db-backup", "scheduler"]);
        let scheduler = &prod[1];
        assert_eq!(
            scheduler.selector.get("role").map(String::as_str),
            Some("web")
        );
        assert_eq!(
            scheduler.selector.get("env").map(String::as_str),
            Some("production")
        );
        assert_eq!(
            scheduler.schedule,
            Schedule::Cron {
                expression: "* * * * *".into(),
                timezone: "UTC".into()
            }
        );
        assert_eq!(prod[0].rpo_ms, Some(15 * 60 * 1000));
        let staging = resolve(&spec, "cutover.toml", "staging", 1000, "ops").unwrap();
        assert_eq!(
            staging.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(),
            ["drill", "scheduler"]
        );
    }

    #[test]
    fn bad_jobs_name_file_key_and_value() {
        for (jobs, expected) in [
            (
                "[jobs.x]\ncommand = [\"true\"]\nschedule = \"61 * * * *\"\n",
                "cutover.toml: key `jobs.x.schedule`: minute \"61\": 61 is out of range 0-59",
            ),
            ("[jobs.x]\ncommand = [\"true\"]\n", "cutover.toml: key `jobs.x`: has no schedule"),
            (
                "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nschedule = \"* * * * *\"\n",
                "key `jobs.x.every`: give schedule or every, not both",
            ),
            (
                "[jobs.x]\ncommand = [\"true\"]\nschedule = \"* * * * *\"\ntimezone = \"Mars/Olympus\"\n",
                "key `jobs.x.timezone`: \"Mars/Olympus\" is not a zone",
            ),
            (
                "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nservice = \"api\"\n",
                "key `jobs.x.service`: \"api\" is not a service of this spec",
            ),
            (
                "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nkind = \"backup\"\n",
                "key `jobs.x.dataset`: a backup job names the data set",
            ),
            (
                "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nkind = \"restore_test\"\ndataset = \"db\"\n",
                "key `jobs.x.environments`: the restore drill would run in production",
            ),
            (
                "[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nenvironments = [\"prod\"]\n",
                "key `jobs.x.environments`: names \"prod\", which is not an environment",
            ),
            ("[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nrun_on = \"all\"\n", "key `jobs.x.run_on`: unknown variant `all`"),
            ("[jobs.x]\ncommand = [\"true\"]\nevery = \"0s\"\n", "key `jobs.x.every`: 0s is under the 1s minimum"),
            ("[jobs.x]\ncommand = [\"true\"]\nschedule = \"0 0 31 2 *\"\n", "never fires"),
            (
                "[environments.production.require_backup]\ndataset = \"shop\"\nmax_age = \"15m\"\n",
                "key `environments.production.require_backup.dataset`: \"shop\" is not backed up by any job of this spec",
            ),
            (
                "[jobs.x]\nkind = \"backup\"\ndataset = \"db\"\nevery = \"1m\"\n[jobs.x.pgbackrest]\nstanza = \"main\"\nscratch_dir = \"/tmp\"\n",
                "key `jobs.x.pgbackrest.scratch_dir`: only a restore drill has scratch_dir",
            ),
            (
                "[jobs.x]\nkind = \"restore_test\"\ndataset = \"db\"\nevery = \"1m\"\nenvironments = [\"staging\"]\n[jobs.x.pgbackrest]\nstanza = \"main\"\n",
                "key `jobs.x.pgbackrest.scratch_dir`: a restore drill needs an absolute scratch_dir",
            ),
            (
                "[jobs.x]\nkind = \"restore_test\"\ndataset = \"db\"\nevery = \"1m\"\nenvironments = [\"staging\"]\n[jobs.x.pgbackrest]\nstanza = \"main\"\nscratch_dir = \"/tmp\"\n[[jobs.x.verify]]\nname = \"n\"\nsql = \"select 1\"\n",
                "key `jobs.x.verify[0].equals`: give exactly one expectation",
            ),
            (
                "[jobs.x]\nkind = \"backup\"\ndataset = \"db\"\nevery = \"1m\"\ncommand = [\"true\"]\n[jobs.x.pgbackrest]\nstanza = \"main\"\n",
                "key `jobs.x.command`: give a command or a [pgbackrest] table, not both",
            ),
        ] {
            let error = refused(jobs);
            assert!(error.contains(expected), "{jobs}\n=> {error}");
        }
    }

    #[test]
    fn a_drill_may_be_let_into_production() {
        let spec = parse("[jobs.x]\ncommand = [\"true\"]\nevery = \"1m\"\nkind = \"restore_test\"\ndataset = \"db\"\nallow_production = true\n").unwrap();
        assert_eq!(
            resolve(&spec, "f", "production", 0, "ops").unwrap().len(),
            1
        );
    }
}
