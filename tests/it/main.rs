//! The integration tests: one binary, every test driving the real
//! `litework` executable against a database of its own in a temporary
//! directory of its own.

mod bench;
mod chaos;
mod cli;
mod database;
mod faults;
mod input;
mod metrics;
mod payloads;
mod prometheus;
mod run;
mod security;
mod shutdown;
mod util;
mod worker;
