//! `cutover completion SHELL` and `cutover man`: shell completion scripts
//! and man pages, generated from the CLI's own definition so they cannot
//! drift from it.

use std::path::Path;

use anyhow::{Context, Result};

/// Prints `shell`'s completion script for `command` to stdout.
pub fn completion(shell: clap_complete::Shell, mut command: clap::Command) {
    let name = command.get_name().to_string();
    clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
}

/// Writes a man page for `command` and one for each of its subcommands, at
/// every depth (`cutover-rollout-status.1`), into `out`, each naming the
/// version in its footer; returns how many.
pub fn man_pages(command: clap::Command, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let source = format!(
        "{} {}",
        command.get_name(),
        command.get_version().unwrap_or_default()
    );
    // Built, every subcommand is named after its path (`cutover-rollout`).
    let mut command = command.disable_help_subcommand(true);
    command.build();
    write_pages(command, &source, out)
        .with_context(|| format!("cannot write the man pages into {}", out.display()))
}

fn write_pages(command: clap::Command, source: &str, out: &Path) -> std::io::Result<usize> {
    let mut written = 0;
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        written += write_pages(sub.clone(), source, out)?;
    }
    clap_mangen::Man::new(command)
        .source(source)
        .generate_to(out)?;
    Ok(written + 1)
}
