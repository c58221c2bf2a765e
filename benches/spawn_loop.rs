//! The floor for "one process per item": K threads spawning `true` (or
//! the given program) N times with `std::process::Command`, stdout and
//! stderr captured as litework does, and nothing else: no queue, no
//! process group, no environment. `benches/run.sh` runs it next to
//! `litework run` and `xargs`.
//!
//!     cargo bench --bench spawn_loop -- [ITEMS] [THREADS] [PROGRAM]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let items: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5000);
    let threads: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let name = args.get(2).cloned().unwrap_or_else(|| "true".into());
    // Looked up once, as litework does: no PATH search in every child.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let program = std::env::split_paths(&path)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| name.clone().into());
    let next = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items {
                    break;
                }
                let ok = Command::new(&program)
                    .arg(i.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "spawn loop: {items} x {name} on {threads} threads in {secs:.2} s \
         ({:.0} items/s), {} failed",
        items as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
}
