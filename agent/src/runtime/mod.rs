//! Runtimes that run releases. The process runtime runs a release as a
//! supervised process group; a docker runtime arrives with the docker issue
//! behind the same interface.

pub mod logs;
pub mod process;
