//! Prometheus metrics and the small HTTP server that exports them.
//!
//! Every process has its own [`Registry`]. Handles are made once, with
//! their label values resolved at start-up, and kept in [`WorkerMetrics`]
//! or [`SupervisorMetrics`]; the hot path only increments them. Values
//! that live elsewhere (busy waits counted by the SQLite busy handler,
//! queue counts in the database, file sizes) are read at scrape time by
//! collectors, and none of those reads scans the items table.
//!
//! Names follow the Prometheus conventions: a `litework_` prefix, base
//! units (`_seconds`, `_bytes`), `_total` on counters, histograms rather
//! than summaries, and no item ids or payloads in labels.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};
use crate::queue::{busy, Queue};

/// How an item's attempt ended, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Done,
    Retry,
    Failed,
    Lost,
    Released,
}

impl Attempt {
    const ALL: [Attempt; 5] = [
        Attempt::Done,
        Attempt::Retry,
        Attempt::Failed,
        Attempt::Lost,
        Attempt::Released,
    ];

    fn label(self) -> &'static str {
        match self {
            Attempt::Done => "done",
            Attempt::Retry => "retry",
            Attempt::Failed => "failed",
            Attempt::Lost => "lost",
            Attempt::Released => "released",
        }
    }
}

fn check<T>(r: prometheus::Result<T>) -> T {
    // Every name, label and bucket below is a constant that is valid, and
    // each is registered once into a registry of its own: an error here is
    // a bug in this file, caught by the unit tests.
    match r {
        Ok(v) => v,
        Err(e) => panic!("metric definition: {e}"),
    }
}

/// Seconds, from 1 ms to about 35 minutes, doubling.
fn item_buckets() -> Vec<f64> {
    check(prometheus::exponential_buckets(0.001, 2.0, 22))
}

/// Seconds, from 50 µs to about 1.6 s.
fn sql_buckets() -> Vec<f64> {
    check(prometheus::exponential_buckets(0.00005, 2.0, 16))
}

fn registry() -> Registry {
    let registry = Registry::new();
    let info = check(GaugeVec::new(
        Opts::new(
            "litework_build_info",
            "litework build; the value is always 1",
        ),
        &["version"],
    ));
    info.with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1.0);
    check(registry.register(Box::new(info)));
    check(registry.register(Box::new(BusyCollector::new())));
    #[cfg(target_os = "linux")]
    check(registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    )));
    registry
}

/// A worker process's metrics.
pub struct WorkerMetrics {
    registry: Registry,
    pub claimed: IntCounter,
    finished: Vec<IntCounter>,
    duration: Vec<Histogram>,
    /// Time of the transaction that records outcomes and claims.
    pub claim_seconds: Histogram,
    pub in_flight: IntGauge,
    pub leases_extended: IntCounter,
    pub commit_wakeups: IntCounter,
    /// Other workers' expired leases this worker's sweeps took back.
    pub requeued_expired: IntCounter,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> WorkerMetrics {
        WorkerMetrics::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> WorkerMetrics {
        let registry = registry();
        let claimed = check(IntCounter::new(
            "litework_items_claimed_total",
            "Items this worker claimed (each claim is one attempt).",
        ));
        let finished_vec = check(IntCounterVec::new(
            Opts::new(
                "litework_items_finished_total",
                "Attempts this worker finished, by outcome: done, retry (failed, will be \
                 retried), failed (for good), lost (lease taken away, outcome dropped), \
                 released (handed back at shutdown).",
            ),
            &["outcome"],
        ));
        let duration_vec = check(HistogramVec::new(
            HistogramOpts::new(
                "litework_item_duration_seconds",
                "Time an attempt ran, from dispatch to its outcome, by outcome.",
            )
            .buckets(item_buckets()),
            &["outcome"],
        ));
        let claim_seconds = check(Histogram::with_opts(
            HistogramOpts::new(
                "litework_claim_duration_seconds",
                "Time of one write transaction that records outcomes and claims items, \
                 including waiting for the write lock.",
            )
            .buckets(sql_buckets()),
        ));
        let in_flight = check(IntGauge::new(
            "litework_items_in_flight",
            "Items this worker holds: running, or claimed ahead and waiting for an executor.",
        ));
        let leases_extended = check(IntCounter::new(
            "litework_leases_extended_total",
            "Leases this worker extended by heartbeat.",
        ));
        let commit_wakeups = check(IntCounter::new(
            "litework_commit_wakeups_total",
            "Wake-ups of this idle worker by its watch on the database's log (inotify) \
             after which it saw another process's commit.",
        ));
        let requeued = requeued_vec();
        let requeued_expired = requeued.with_label_values(&["expired"]);
        let finished = Attempt::ALL
            .iter()
            .map(|o| finished_vec.with_label_values(&[o.label()]))
            .collect();
        let duration = Attempt::ALL
            .iter()
            .map(|o| duration_vec.with_label_values(&[o.label()]))
            .collect();
        check(registry.register(Box::new(claimed.clone())));
        check(registry.register(Box::new(finished_vec)));
        check(registry.register(Box::new(duration_vec)));
        check(registry.register(Box::new(claim_seconds.clone())));
        check(registry.register(Box::new(in_flight.clone())));
        check(registry.register(Box::new(leases_extended.clone())));
        check(registry.register(Box::new(commit_wakeups.clone())));
        check(registry.register(Box::new(requeued)));
        WorkerMetrics {
            registry,
            claimed,
            finished,
            duration,
            claim_seconds,
            in_flight,
            leases_extended,
            commit_wakeups,
            requeued_expired,
        }
    }

    /// Counts one finished attempt.
    pub fn finished(&self, outcome: Attempt) {
        self.finished[outcome as usize].inc();
    }

    /// Records how long an attempt ran.
    pub fn observe(&self, outcome: Attempt, seconds: f64) {
        self.duration[outcome as usize].observe(seconds);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The supervisor's metrics: its own counters, and the queue's state read
/// from the database at scrape time.
pub struct SupervisorMetrics {
    registry: Registry,
    pub restarts: IntCounter,
    requeued: IntCounterVec,
    pub sweep_seconds: Histogram,
    pub workers_live: IntGauge,
}

/// Leases taken back, by cause; served by the supervisor and, for the
/// sweeps they run themselves, by workers.
fn requeued_vec() -> IntCounterVec {
    check(IntCounterVec::new(
        Opts::new(
            "litework_leases_requeued_total",
            "Leases this process took back from workers, by cause: dead_worker (a worker \
             the supervisor saw die), expired (found by a sweep).",
        ),
        &["cause"],
    ))
}

/// Why leases were requeued, as a label value.
#[derive(Debug, Clone, Copy)]
pub enum RequeueCause {
    DeadWorker,
    Expired,
}

impl SupervisorMetrics {
    pub fn new(queue: Queue) -> SupervisorMetrics {
        let registry = registry();
        let restarts = check(IntCounter::new(
            "litework_worker_restarts_total",
            "Worker processes restarted after dying.",
        ));
        let requeued = requeued_vec();
        for cause in ["dead_worker", "expired"] {
            requeued.with_label_values(&[cause]);
        }
        let sweep_seconds = check(Histogram::with_opts(
            HistogramOpts::new(
                "litework_sweep_duration_seconds",
                "Time of one sweep of expired leases.",
            )
            .buckets(sql_buckets()),
        ));
        let workers_live = check(IntGauge::new(
            "litework_workers_live",
            "Worker processes of this supervisor that are running.",
        ));
        check(registry.register(Box::new(restarts.clone())));
        check(registry.register(Box::new(requeued.clone())));
        check(registry.register(Box::new(sweep_seconds.clone())));
        check(registry.register(Box::new(workers_live.clone())));
        check(registry.register(Box::new(QueueCollector::new(queue))));
        SupervisorMetrics {
            registry,
            restarts,
            requeued,
            sweep_seconds,
            workers_live,
        }
    }

    pub fn requeued(&self, cause: RequeueCause, n: u64) {
        let label = match cause {
            RequeueCause::DeadWorker => "dead_worker",
            RequeueCause::Expired => "expired",
        };
        self.requeued.with_label_values(&[label]).inc_by(n);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Exports the process-wide lock counters of [`busy`]: waits for the write
/// lock, and the time write transactions held it.
struct BusyCollector {
    descs: Vec<Desc>,
}

impl BusyCollector {
    fn new() -> BusyCollector {
        let (waits, waited, held) = BusyCollector::counters(0, 0.0, 0.0);
        let descs = waits
            .desc()
            .into_iter()
            .chain(waited.desc())
            .chain(held.desc())
            .cloned()
            .collect();
        BusyCollector { descs }
    }

    fn counters(
        waits: u64,
        waited: f64,
        held: f64,
    ) -> (IntCounter, prometheus::Counter, prometheus::Counter) {
        let w = check(IntCounter::new(
            "litework_sqlite_busy_waits_total",
            "Times this process slept waiting for an SQLite lock (SQLITE_BUSY).",
        ));
        let s = check(prometheus::Counter::new(
            "litework_sqlite_busy_wait_seconds_total",
            "Time this process spent asleep waiting for SQLite locks.",
        ));
        let h = check(prometheus::Counter::new(
            "litework_sqlite_write_lock_held_seconds_total",
            "Time this process's write transactions held SQLite's write lock.",
        ));
        w.inc_by(waits);
        s.inc_by(waited);
        h.inc_by(held);
        (w, s, h)
    }
}

impl Collector for BusyCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (w, s, h) = BusyCollector::counters(
            busy::waits(),
            busy::waited().as_secs_f64(),
            busy::held().as_secs_f64(),
        );
        w.collect()
            .into_iter()
            .chain(s.collect())
            .chain(h.collect())
            .collect()
    }
}

/// Reads the queue's counts, the age of its head and the file sizes at
/// scrape time: small tables and one index entry, whatever the queue size.
struct QueueCollector {
    queue: Queue,
    db: PathBuf,
    descs: Vec<Desc>,
}

struct QueueGauges {
    items: prometheus::IntGaugeVec,
    oldest: Gauge,
    db_bytes: IntGauge,
    wal_bytes: IntGauge,
}

impl QueueCollector {
    fn new(queue: Queue) -> QueueCollector {
        let db = queue.path().to_path_buf();
        let g = QueueCollector::gauges();
        let descs = [
            g.items.desc(),
            g.oldest.desc(),
            g.db_bytes.desc(),
            g.wal_bytes.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        QueueCollector { queue, db, descs }
    }

    fn gauges() -> QueueGauges {
        QueueGauges {
            items: check(prometheus::IntGaugeVec::new(
                Opts::new("litework_queue_items", "Items in the queue, by status."),
                &["status"],
            )),
            oldest: check(Gauge::new(
                "litework_queue_oldest_ready_age_seconds",
                "Time since the next item to run was added; 0 when none is ready.",
            )),
            db_bytes: check(IntGauge::new(
                "litework_database_size_bytes",
                "Size of the queue database file.",
            )),
            wal_bytes: check(IntGauge::new(
                "litework_wal_size_bytes",
                "Size of the queue database's write-ahead log.",
            )),
        }
    }
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let g = QueueCollector::gauges();
        match self.queue.status() {
            Ok(s) => {
                for (status, n) in [
                    ("pending", s.pending),
                    ("running", s.running),
                    ("done", s.done),
                    ("failed", s.failed),
                ] {
                    g.items
                        .with_label_values(&[status])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                g.oldest.set(s.oldest_ready_age_s.unwrap_or(0.0));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the queue"),
        }
        let size = |suffix: &str| {
            let mut p = self.db.clone().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).map_or(0, |m| i64::try_from(m.len()).unwrap_or(i64::MAX))
        };
        g.db_bytes.set(size(""));
        g.wal_bytes.set(size("-wal"));
        [
            g.items.collect(),
            g.oldest.collect(),
            g.db_bytes.collect(),
            g.wal_bytes.collect(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Returns the Prometheus HTTP service-discovery document on request.
pub type Discovery = Box<dyn Fn() -> String + Send + Sync>;

/// Who may read the endpoints and over what, from a file in the format
/// of the Prometheus exporters' web configuration:
///
/// ```yaml
/// tls_server_config:
///   cert_file: server.crt   # PEM; relative paths are relative to this file
///   key_file: server.key
/// basic_auth_users:
///   prometheus: $2y$10$...  # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')
/// ```
///
/// With users, `/metrics` and `/sd` need HTTP basic authentication;
/// `/healthz` stays open for liveness probes and says nothing else.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    tls: Option<tiny_http::SslConfig>,
    users: std::collections::HashMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WebFile {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: std::collections::HashMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl WebConfig {
    /// Reads and checks a web configuration file.
    pub fn load(path: &std::path::Path) -> Result<WebConfig> {
        let bad = |reason: String| Error::Config(format!("{}: {reason}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let file: WebFile = serde_yaml_ng::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let read = |p: &PathBuf| {
            let full = dir.join(p);
            std::fs::read(&full).map_err(|e| bad(format!("{}: {e}", full.display())))
        };
        let tls = match &file.tls_server_config {
            Some(t) => Some(tiny_http::SslConfig {
                certificate: read(&t.cert_file)?,
                private_key: read(&t.key_file)?,
            }),
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            if bcrypt::verify("", hash).is_err() {
                return Err(bad(format!("basic_auth_users.{user}: not a bcrypt hash")));
            }
        }
        Ok(WebConfig {
            tls,
            users: file.basic_auth_users,
        })
    }

    /// Returns true if and only if the request may read protected pages.
    fn allows(
        &self,
        request: &tiny_http::Request,
        accepted: &std::sync::Mutex<Vec<String>>,
    ) -> bool {
        use base64::Engine;
        if self.users.is_empty() {
            return true;
        }
        let Some(value) = request
            .headers()
            .iter()
            .find(|h| h.field.equiv("Authorization"))
            .map(|h| h.value.as_str().to_string())
        else {
            return false;
        };
        // bcrypt is slow on purpose; remember the headers already checked
        // so that a scrape every few seconds does not cost a core. The
        // list is not locked while bcrypt runs: a client sending wrong
        // passwords must not hold up the others.
        let seen = |value: &String| {
            accepted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(value)
        };
        if seen(&value) {
            return true;
        }
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = text.split_once(':') else {
            return false;
        };
        let ok = self
            .users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false));
        if ok {
            let mut seen = accepted.lock().unwrap_or_else(|p| p.into_inner());
            if !seen.contains(&value) {
                if seen.len() >= 16 {
                    seen.remove(0);
                }
                seen.push(value);
            }
        }
        ok
    }
}

/// The HTTP endpoint of one process: `/metrics`, `/healthz` and, on the
/// supervisor, `/sd` (Prometheus HTTP service discovery). Bound when made,
/// so a busy port fails start-up; stops when dropped.
///
/// Each client connection is answered on a thread of its own, so a client
/// that stops reading its answers blocks only itself: neither other
/// scrapes nor the end of the process wait for it.
pub struct Exporter {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
    /// Disconnects when the accept loop ends.
    ended: Receiver<()>,
}

/// An endpoint bound but not answering yet: `litework run` binds before it
/// adds its input, so that a busy port or a bad address changes nothing.
pub struct Bound {
    server: tiny_http::Server,
    addr: SocketAddr,
    web: WebConfig,
}

/// What every connection's thread shares.
struct Pages {
    registry: Registry,
    discovery: Option<Discovery>,
    web: WebConfig,
    /// Basic-auth header values already checked (bcrypt is slow on purpose).
    accepted: std::sync::Mutex<Vec<String>>,
}

/// How long a connection's thread waits for its next request before it
/// ends; the next request on that connection then starts a new one.
const CONNECTION_IDLE: Duration = Duration::from_secs(5);

/// How long dropping an [`Exporter`] waits for its accept loop to end.
const STOP_WAIT: Duration = Duration::from_secs(1);

impl Exporter {
    /// Binds `addr` and answers on it at once.
    pub fn serve(
        addr: &str,
        registry: Registry,
        discovery: Option<Discovery>,
        web: WebConfig,
    ) -> Result<Exporter> {
        Exporter::bind(addr, web)?.serve(registry, discovery)
    }

    /// Binds `addr` (port 0: any free port) without answering yet.
    pub fn bind(addr: &str, web: WebConfig) -> Result<Bound> {
        let server = match web.tls.clone() {
            Some(tls) => tiny_http::Server::https(addr, tls),
            None => tiny_http::Server::http(addr),
        }
        .map_err(|e| Error::Config(format!("metrics address {addr}: {e}")))?;
        let bound = match server.server_addr() {
            tiny_http::ListenAddr::IP(a) => a,
            #[allow(unreachable_patterns)]
            _ => {
                return Err(Error::Config(format!(
                    "metrics address {addr}: not an IP address"
                )))
            }
        };
        Ok(Bound {
            server,
            addr: bound,
            web,
        })
    }

    /// The address actually bound (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Bound {
    /// The address actually bound (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts answering requests.
    pub fn serve(self, registry: Registry, discovery: Option<Discovery>) -> Result<Exporter> {
        let server = Arc::new(self.server);
        let serving = server.clone();
        let pages = Arc::new(Pages {
            registry,
            discovery,
            web: self.web,
            accepted: std::sync::Mutex::new(Vec::new()),
        });
        let (ending, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                accept(&serving, &pages);
                drop(ending);
            })
            .map_err(|e| Error::Start(format!("cannot start the metrics thread: {e}")))?;
        Ok(Exporter {
            server,
            addr: self.addr,
            thread: Some(thread),
            ended,
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.unblock();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // The accept loop never writes to a client, so it ends at once; the
        // wait is bounded all the same, as a process must be able to exit
        // whatever its clients do. Connection threads are not waited for.
        if let Err(RecvTimeoutError::Disconnected) = self.ended.recv_timeout(STOP_WAIT) {
            let _ = thread.join();
        }
    }
}

/// Hands each request to its connection's thread, starting one when the
/// connection has none.
fn accept(server: &tiny_http::Server, pages: &Arc<Pages>) {
    type Connections = std::collections::HashMap<SocketAddr, Sender<tiny_http::Request>>;
    let connections: Arc<std::sync::Mutex<Connections>> = Arc::default();
    for request in server.incoming_requests() {
        let Some(peer) = request.remote_addr().copied() else {
            // Not a TCP client (tiny_http only listens on TCP here).
            answer(request, pages);
            continue;
        };
        let mut open = connections.lock().unwrap_or_else(|p| p.into_inner());
        // A connection's thread takes itself out of the map under this lock
        // before it ends, so a sender found here has a thread behind it.
        let request = match open.get(&peer) {
            Some(tx) => match tx.send(request) {
                Ok(()) => continue,
                Err(crossbeam_channel::SendError(request)) => request,
            },
            None => request,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let (shared, map) = (pages.clone(), connections.clone());
        let started = std::thread::Builder::new()
            .name("metrics-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || serve_connection(peer, &rx, &shared, &map));
        match started {
            Ok(_) => {
                let _ = tx.send(request);
                open.insert(peer, tx);
            }
            Err(e) => {
                // No thread to spare (a process limit reached): answered
                // here, where a client that does not read its answer would
                // stall every scrape again. Better than no answer at all.
                tracing::warn!(error = %e, "metrics: cannot start a connection thread");
                drop(open);
                answer(request, pages);
            }
        }
    }
}

/// Answers one connection's requests in order until it has been idle for
/// [`CONNECTION_IDLE`].
fn serve_connection(
    peer: SocketAddr,
    rx: &Receiver<tiny_http::Request>,
    pages: &Pages,
    connections: &std::sync::Mutex<
        std::collections::HashMap<SocketAddr, Sender<tiny_http::Request>>,
    >,
) {
    loop {
        match rx.recv_timeout(CONNECTION_IDLE) {
            Ok(request) => answer(request, pages),
            Err(_) => {
                let mut open = connections.lock().unwrap_or_else(|p| p.into_inner());
                // Whatever was sent before the entry went is answered here.
                match rx.try_recv() {
                    Ok(request) => {
                        drop(open);
                        answer(request, pages);
                    }
                    Err(_) => {
                        open.remove(&peer);
                        return;
                    }
                }
            }
        }
    }
}

fn answer(request: tiny_http::Request, pages: &Pages) {
    let allowed = pages.web.allows(&request, &pages.accepted);
    respond(
        request,
        &pages.registry,
        pages.discovery.as_deref(),
        allowed,
    );
}

fn respond(
    request: tiny_http::Request,
    registry: &Registry,
    discovery: Option<&(dyn Fn() -> String + Send + Sync)>,
    allowed: bool,
) {
    let header = |v: &str| {
        tiny_http::Header::from_bytes(&b"Content-Type"[..], v.as_bytes())
            .unwrap_or_else(|()| panic!("constant header {v}"))
    };
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let response = match (request.method(), path.as_str()) {
        (tiny_http::Method::Get, "/healthz") => {
            tiny_http::Response::from_string("ok\n").with_header(header("text/plain"))
        }
        _ if !allowed => {
            let challenge = tiny_http::Header::from_bytes(
                &b"WWW-Authenticate"[..],
                &b"Basic realm=\"litework\""[..],
            )
            .unwrap_or_else(|()| panic!("constant header"));
            tiny_http::Response::from_string("unauthorized\n")
                .with_status_code(401)
                .with_header(challenge)
        }
        (tiny_http::Method::Get, "/metrics") => {
            let mut body = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => {
                    tiny_http::Response::from_data(body).with_header(header(encoder.format_type()))
                }
                Err(e) => tiny_http::Response::from_string(format!("encoding metrics: {e}"))
                    .with_status_code(500),
            }
        }
        (tiny_http::Method::Get, "/sd") if discovery.is_some() => {
            let body = discovery.map(|d| d()).unwrap_or_default();
            tiny_http::Response::from_string(body).with_header(header("application/json"))
        }
        _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
    };
    // A client that went away is its own problem.
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_metrics_register_and_encode() {
        let m = WorkerMetrics::new();
        m.claimed.inc();
        m.finished(Attempt::Lost);
        m.observe(Attempt::Done, 0.5);
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&m.registry().gather(), &mut body)
            .unwrap();
        let text = String::from_utf8(body).unwrap();
        for needle in [
            "litework_items_claimed_total 1",
            "litework_items_finished_total{outcome=\"lost\"} 1",
            "litework_item_duration_seconds_count{outcome=\"done\"} 1",
            "litework_sqlite_busy_waits_total",
            "litework_sqlite_write_lock_held_seconds_total",
            "litework_build_info{version=",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
