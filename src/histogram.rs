//! A lock-free latency histogram with about 3% resolution.
//!
//! Values are nanoseconds. Below 32 each value has its own bucket; above,
//! every power of two is split into 16 buckets, so a bucket is never wider
//! than 1/16 of its lower bound. 976 buckets cover all of `u64`. Recording
//! is one relaxed atomic add, cheap enough for a worker to time every
//! claim. Histograms from several processes merge by adding buckets, which
//! is how `litework bench` gets percentiles over all its workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: usize = 976;

/// Counts of values per bucket.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("Histogram")
            .field("count", &s.count())
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < 32 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros() as usize;
    let m = (v >> (e - 4)) as usize;
    (e - 4) * 16 + m
}

/// The smallest value that falls in bucket `i`.
fn lower_bound(i: usize) -> u64 {
    if i < 32 {
        return i as u64;
    }
    let e = i / 16 + 3;
    let m = (i % 16 + 16) as u64;
    m << (e - 4)
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn record(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
    }

    /// The buckets as they are now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let n = c.load(Ordering::Relaxed);
                    (n > 0).then_some((i as u16, n))
                })
                .collect(),
        }
    }
}

/// The non-empty buckets of a [`Histogram`], as `(bucket, count)`; what
/// crosses a process boundary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub buckets: Vec<(u16, u64)>,
}

impl Snapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, n)| n).sum()
    }

    /// Adds the counts of `other` into this one.
    pub fn merge(&mut self, other: &Snapshot) {
        let mut all = vec![0u64; BUCKETS];
        for &(i, n) in self.buckets.iter().chain(&other.buckets) {
            if let Some(slot) = all.get_mut(usize::from(i)) {
                *slot += n;
            }
        }
        self.buckets = all
            .into_iter()
            .enumerate()
            .filter(|&(_, n)| n > 0)
            .map(|(i, n)| (i as u16, n))
            .collect();
    }

    /// The value below which a fraction `q` (0..=1) of the values fall,
    /// reported as the middle of its bucket; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(i, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let i = usize::from(i);
                let lo = lower_bound(i);
                let hi = if i + 1 < BUCKETS {
                    lower_bound(i + 1)
                } else {
                    u64::MAX
                };
                return Some(Duration::from_nanos(lo + (hi - lo) / 2));
            }
        }
        None
    }

    /// The upper end of the highest non-empty bucket.
    pub fn max(&self) -> Option<Duration> {
        let &(i, _) = self.buckets.last()?;
        let i = usize::from(i);
        let hi = if i + 1 < BUCKETS {
            lower_bound(i + 1) - 1
        } else {
            u64::MAX
        };
        Some(Duration::from_nanos(hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_narrow() {
        let mut last = 0;
        for v in (0..20_000u64).chain([1 << 40, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= last || v > 20_000, "bucket of {v} went down");
            assert!(b < BUCKETS);
            assert!(lower_bound(b) <= v, "{v} below its bucket's bound");
            if b + 1 < BUCKETS {
                let next = lower_bound(b + 1);
                assert!(next > v, "{v} at or past the next bucket");
                assert!((next - lower_bound(b)) as f64 <= (lower_bound(b) as f64 / 16.0).max(1.0));
            }
            last = b;
        }
    }

    #[test]
    fn quantiles_merge_across_snapshots() {
        let a = Histogram::new();
        let b = Histogram::new();
        for ms in 1..=99 {
            a.record(Duration::from_millis(ms));
        }
        b.record(Duration::from_secs(10));
        let mut s = a.snapshot();
        s.merge(&b.snapshot());
        assert_eq!(s.count(), 100);
        let p50 = s.quantile(0.5).unwrap();
        assert!((48..=52).contains(&p50.as_millis()), "{p50:?}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((96..=102).contains(&p99.as_millis()), "{p99:?}");
        let max = s.max().unwrap();
        assert!((10_000..=10_700).contains(&max.as_millis()), "{max:?}");
        assert_eq!(Snapshot::default().quantile(0.5), None);
    }
}
