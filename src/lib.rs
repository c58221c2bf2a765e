//! litework runs large batches of independent work items across worker
//! processes that coordinate through one SQLite database in WAL mode.
//!
//! The crate is the library behind the `litework` binary:
//!
//! - [`queue`]: the store. Opening and recognising a queue file, the
//!   schema and its migrations, and every state change of an item (add,
//!   claim, record, requeue, retry) as fenced SQL statements inside one
//!   immediate transaction.
//! - [`worker`]: the claim → execute → record loop of one process, with
//!   its executor threads, heartbeats and graceful drain. Items run
//!   through a [`worker::Handler`]: a closure, or a command.
//! - [`supervisor`]: `litework run`, which keeps N worker processes
//!   going, requeues the leases of the ones that die and sweeps expired
//!   leases.
//! - [`exec`]: running one item as a command, without a shell, in its own
//!   process group.
//! - [`input`]: parsing what `litework add` reads (lines, JSON Lines,
//!   NUL-separated records).
//!
//! ```no_run
//! use litework::queue::{NewItem, Queue};
//! use litework::worker::{Outcome, Worker, WorkerConfig};
//!
//! # fn main() -> litework::Result<()> {
//! let queue = Queue::create("jobs.db")?;
//! queue.add((1..=100).map(|n| Ok(NewItem::new(n.to_string()))), 3)?;
//!
//! let config = WorkerConfig { concurrency: 4, ..WorkerConfig::default() };
//! let worker = Worker::new(queue, config, |job: &litework::queue::Job, _: &_| {
//!     let n: u64 = String::from_utf8_lossy(&job.payload).parse().unwrap_or(0);
//!     Outcome::Done((n * n).to_string().into_bytes())
//! });
//! // Nothing will send on `stop`; the worker returns when the queue drains.
//! let (_keep, stop) = crossbeam_channel::bounded::<()>(1);
//! let report = worker.run(stop)?;
//! assert_eq!(report.done, 100);
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod exec;
pub mod histogram;
pub mod input;
pub mod metrics;
pub mod queue;
pub mod supervisor;
pub mod worker;

pub use error::{Error, Result};
