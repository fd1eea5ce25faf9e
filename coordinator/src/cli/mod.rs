pub mod access;
pub mod artifacts;
pub mod ca;
pub mod client;
pub mod dev;
pub mod nodes;
pub mod rollouts;
