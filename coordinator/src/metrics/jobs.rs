//! Job and recovery metrics: runs by outcome, and per data set the newest
//! successful backup and restore drill against their targets. The figures
//! are kept here as the runs end (and loaded from the stored runs at
//! start), and ages are worked out at each scrape, so they follow real
//! time between runs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{FloatGauge, Labels};
use crate::store::{JobDef, JobKind, JobRun, RunState};

/// (app, env, dataset)
type DatasetKey = (String, String, String);

#[derive(Debug, Default, Clone)]
struct Figures {
    backup_success_s: Option<f64>,
    /// When the newest successful backup's data is from.
    backup_data_s: Option<f64>,
    /// Each job's target (or interval), by job name: a data set may have
    /// several backup jobs (incremental, nightly full); the tightest counts.
    rpo_s: BTreeMap<String, f64>,
    drill_success_s: Option<f64>,
    drill_duration_s: Option<f64>,
    drill_data_age_s: Option<f64>,
    /// The newest drill that ended: when, and whether it passed.
    drill_last: Option<(f64, bool)>,
    drill_interval_s: BTreeMap<String, f64>,
    rto_s: BTreeMap<String, f64>,
}

#[derive(Default)]
pub struct JobMetrics {
    runs: Family<Labels, Counter>,
    backup_success: Family<Labels, FloatGauge>,
    backup_age: Family<Labels, FloatGauge>,
    rpo: Family<Labels, FloatGauge>,
    drill_success: Family<Labels, FloatGauge>,
    drill_duration: Family<Labels, FloatGauge>,
    drill_data_age: Family<Labels, FloatGauge>,
    drill_passed: Family<Labels, FloatGauge>,
    drill_interval: Family<Labels, FloatGauge>,
    rto: Family<Labels, FloatGauge>,
    figures: Mutex<BTreeMap<DatasetKey, Figures>>,
}

/// When a run's data is from: the `data_time` (or `stopped_at`) it
/// reported, in Unix seconds, else when it ended.
pub fn data_time_s(run: &JobRun) -> Option<f64> {
    ["data_time", "stopped_at"]
        .iter()
        .find_map(|k| run.facts.get(*k).and_then(serde_json::Value::as_f64))
        .or_else(|| run.ended_ms.map(|ms| ms as f64 / 1000.0))
}

/// How old a drill's restored data was: the `data_age_seconds` it
/// reported (a pgBackRest drill: recovery end minus data time), else its
/// start minus the `data_time` it reported.
pub fn drill_data_age_s(run: &JobRun) -> Option<f64> {
    let fact = |k: &str| run.facts.get(k).and_then(serde_json::Value::as_f64);
    fact("data_age_seconds")
        .or_else(|| fact("data_time").map(|t| run.started_ms as f64 / 1000.0 - t))
}

impl JobMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            ("backup_last_success_timestamp_seconds", "When the newest successful backup of each data set ended", &self.backup_success),
            ("backup_age_seconds", "Age of the data in the newest successful backup of each data set (now minus the time it reported as data_time or stopped_at, else its end)", &self.backup_age),
            ("rpo_target_seconds", "Each data set's recovery point objective (its backup job's rpo)", &self.rpo),
            ("restore_test_last_success_timestamp_seconds", "When the newest passing restore drill of each data set ended", &self.drill_success),
            ("restore_test_duration_seconds", "How long the newest passing restore drill of each data set took: the measured recovery time", &self.drill_duration),
            ("restore_test_data_age_seconds", "How old the restored data was when the newest passing drill started (from the data_time it reported): the measured recovery point", &self.drill_data_age),
            ("restore_test_passed", "1 if the newest restore drill of each data set that ended passed, 0 if it failed, timed out or was lost", &self.drill_passed),
            ("restore_test_interval_seconds", "How often each data set's restore drill is scheduled to run", &self.drill_interval),
            ("rto_target_seconds", "Each data set's recovery time objective (its restore_test job's rto)", &self.rto),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "job_runs",
            "Job runs by kind (job, backup, restore_test) and how they ended: succeeded, failed, timed_out, lost (its node went away mid-run) or skipped (due while a run still went)",
            self.runs.clone(),
        );
    }

    /// Counts a run that just ended, and takes in its figures.
    pub fn run_ended(&self, run: &JobRun) {
        self.runs
            .get_or_create(&vec![
                ("app".to_string(), run.app.clone()),
                ("env".to_string(), run.env.clone()),
                ("job".to_string(), run.job.clone()),
                ("kind".to_string(), run.kind.as_str().to_string()),
                ("outcome".to_string(), run.state.as_str().to_string()),
            ])
            .inc();
        self.run_seen(run);
    }

    /// Takes in a run's figures without counting it (a stored run, at
    /// start).
    pub fn run_seen(&self, run: &JobRun) {
        let (Some(dataset), Some(ended)) = (&run.dataset, run.ended_ms) else {
            return;
        };
        if run.state == RunState::Skipped {
            return;
        }
        let ended_s = ended as f64 / 1000.0;
        let mut figures = self.figures.lock().expect("job metrics lock");
        let f = figures
            .entry((run.app.clone(), run.env.clone(), dataset.clone()))
            .or_default();
        let passed = run.state == RunState::Succeeded;
        match run.kind {
            JobKind::Backup if passed && f.backup_success_s.is_none_or(|s| s < ended_s) => {
                f.backup_success_s = Some(ended_s);
                f.backup_data_s = data_time_s(run);
            }
            JobKind::RestoreTest => {
                if f.drill_last.is_none_or(|(s, _)| s < ended_s) {
                    f.drill_last = Some((ended_s, passed));
                }
                if passed && f.drill_success_s.is_none_or(|s| s < ended_s) {
                    f.drill_success_s = Some(ended_s);
                    f.drill_duration_s = Some((ended - run.started_ms) as f64 / 1000.0);
                    f.drill_data_age_s = drill_data_age_s(run);
                }
            }
            _ => {}
        }
    }

    /// Takes in a job's targets as applied, and how often it runs.
    pub fn targets(&self, job: &JobDef, period_ms: Option<i64>) {
        self.set_targets(job, period_ms, true);
    }

    /// Forgets the targets of a removed job (its runs' figures stay).
    pub fn removed(&self, job: &JobDef) {
        self.set_targets(job, None, false);
    }

    fn set_targets(&self, job: &JobDef, period_ms: Option<i64>, applied: bool) {
        let Some(dataset) = &job.dataset else { return };
        let seconds = |ms: Option<u64>| ms.filter(|_| applied).map(|ms| ms as f64 / 1000.0);
        let mut figures = self.figures.lock().expect("job metrics lock");
        let f = figures
            .entry((job.app.clone(), job.env.clone(), dataset.clone()))
            .or_default();
        let set = |map: &mut BTreeMap<String, f64>, value: Option<f64>| match value {
            Some(value) => {
                map.insert(job.name.clone(), value);
            }
            None => {
                map.remove(&job.name);
            }
        };
        match job.kind {
            JobKind::Backup => set(&mut f.rpo_s, seconds(job.rpo_ms)),
            JobKind::RestoreTest => {
                set(&mut f.rto_s, seconds(job.rto_ms));
                set(
                    &mut f.drill_interval_s,
                    seconds(period_ms.map(|ms| ms.max(0) as u64)),
                );
            }
            JobKind::Job => {}
        }
    }

    /// Sets the gauges for a scrape at `now_s`.
    pub(super) fn render(&self, now_s: f64) {
        let families = [
            &self.backup_success,
            &self.backup_age,
            &self.rpo,
            &self.drill_success,
            &self.drill_duration,
            &self.drill_data_age,
            &self.drill_passed,
            &self.drill_interval,
            &self.rto,
        ];
        for family in families {
            family.clear();
        }
        let figures = self.figures.lock().expect("job metrics lock");
        for ((app, env, dataset), f) in figures.iter() {
            let labels: Labels = vec![
                ("app".to_string(), app.clone()),
                ("env".to_string(), env.clone()),
                ("dataset".to_string(), dataset.clone()),
            ];
            let backup_age = f.backup_data_s.map(|t| (now_s - t).max(0.0));
            for (family, value) in [
                (&self.backup_success, f.backup_success_s),
                (&self.backup_age, backup_age),
                (&self.rpo, tightest(&f.rpo_s)),
                (&self.drill_success, f.drill_success_s),
                (&self.drill_duration, f.drill_duration_s),
                (&self.drill_data_age, f.drill_data_age_s),
                (
                    &self.drill_passed,
                    f.drill_last.map(|(_, passed)| f64::from(u8::from(passed))),
                ),
                (&self.drill_interval, tightest(&f.drill_interval_s)),
                (&self.rto, tightest(&f.rto_s)),
            ] {
                if let Some(value) = value {
                    family.get_or_create(&labels).set(value);
                }
            }
        }
    }
}

/// The smallest of several jobs' targets (or intervals).
fn tightest(by_job: &BTreeMap<String, f64>) -> Option<f64> {
    by_job.values().copied().reduce(f64::min)
}
