//! Checks the spec's sections share (`[migrate]`, `[[hooks]]`): each
//! names a service and gives commands. Errors are (key, message) pairs,
//! the key relative to the section.

use std::collections::BTreeMap;

use cutover_common::rules;

/// `service` must be one of `services`.
pub fn known_service(service: &str, services: &[&String]) -> Result<(), (String, String)> {
    if services.iter().any(|s| s.as_str() == service) {
        return Ok(());
    }
    let names: Vec<&str> = services.iter().map(|s| s.as_str()).collect();
    Err((
        "service".into(),
        format!(
            "{service:?} is not a service of this spec; name one of {}",
            names.join(", ")
        ),
    ))
}

/// A command is given when it has a program to run.
pub fn is_empty(command: &[String]) -> bool {
    command.first().is_none_or(|program| program.is_empty())
}

/// Environment variables a spec adds: valid names, values without NUL.
pub fn env_vars(vars: &BTreeMap<String, String>) -> Result<(), (String, String)> {
    for (name, value) in vars {
        rules::env_var_name(name).map_err(|e| (name.clone(), e.message))?;
        if value.contains('\0') {
            return Err((
                name.clone(),
                "the value contains a NUL byte, which an environment variable cannot hold; remove it".into(),
            ));
        }
    }
    Ok(())
}
