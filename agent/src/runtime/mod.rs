//! Runtimes that run releases: a supervised process group (`process`), or a
//! container of a pinned image (`docker`), under the same supervisor.

pub mod docker;
pub mod logs;
pub mod process;

use std::path::Path;

/// A command as a release runs it: in `workdir`, in a process group of its
/// own (so everything it starts can be signalled together), with only
/// `PATH` and `env`, never the agent's own environment, and no stdin.
/// Exec checks run this way too, so they see what the release sees.
pub fn release_command(
    program: &str,
    args: &[String],
    workdir: &Path,
    env: &[(String, String)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .current_dir(workdir)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .process_group(0);
    command
}
