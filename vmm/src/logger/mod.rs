//! Rate limiting for the log, per call site, in front of env_logger.
//!
//! A guest controls many paths that log: malformed descriptor chains, bad
//! MSI-X writes, refused BAR moves, and the `error!` lines the virtio-queue
//! crate writes itself. A guest looping on one of them must not fill the
//! host's disk or bury real diagnostics, so every record, from any crate,
//! passes one token bucket per call site (file and line) here rather than
//! a check at each call site. Dropped records are counted; the next record
//! the site is allowed to write says how many were dropped before it, and
//! [`Log::flush`] (called at exit) writes a line for each site that still
//! has a count.
//!
//! Limiting starts with [`RateLimitedLogger::start_limiting`], called once
//! the VM is built: nothing the guest does can log before its vCPUs run,
//! and start-up logs once per device from one call site (the topology),
//! which could exceed a burst on a big VM.

mod bucket;
#[cfg(test)]
mod tests;

pub use bucket::{Clock, Limits, MonotonicClock};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use log::{Level, Log, Metadata, Record};

use bucket::{Bucket, Rate};

/// Independent locks over the sites, so device threads logging from
/// different places rarely wait for each other.
const SHARDS: usize = 8;

/// Sites without a `'static` file name (records not made by the `log`
/// macros) are kept by owned strings, at most this many; beyond that they
/// share one bucket per shard.
pub const MAX_DYNAMIC_SITES: usize = 256;

/// Where a record comes from. Records made by the `log` macros, in any
/// crate, carry a `'static` file name, so they cost no allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SiteKey {
    Static {
        file: &'static str,
        line: u32,
    },
    Owned {
        target: Box<str>,
        file: Box<str>,
        line: u32,
    },
    /// The shared bucket of dynamic sites beyond `MAX_DYNAMIC_SITES`.
    Overflow,
}

/// The limiter's state for one call site.
#[derive(Debug)]
struct Site {
    bucket: Bucket,
    /// Records dropped since the site last wrote one.
    suppressed: u64,
    /// For the summary at exit, which must pass the same filter.
    level: Level,
    target: Box<str>,
}

/// What the limiter decided for one record.
enum Verdict {
    Drop,
    /// Write it, noting how many records of this site were dropped before.
    Pass {
        suppressed: u64,
    },
}

/// A [`Log`] that passes each call site's records through a token bucket
/// before handing them to `inner` (see the module documentation).
pub struct RateLimitedLogger<L, C = MonotonicClock> {
    inner: L,
    clock: C,
    rate: Rate,
    limiting: AtomicBool,
    shards: [Mutex<HashMap<SiteKey, Site>>; SHARDS],
    dynamic_sites: AtomicUsize,
}

impl<L: Log, C: Clock> RateLimitedLogger<L, C> {
    /// Wraps `inner`; records pass unlimited until
    /// [`start_limiting`](Self::start_limiting).
    pub fn new(inner: L, clock: C, limits: Limits) -> Self {
        RateLimitedLogger {
            inner,
            clock,
            rate: limits.into(),
            limiting: AtomicBool::new(false),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            dynamic_sites: AtomicUsize::new(0),
        }
    }

    /// Applies the limits from now on.
    pub fn start_limiting(&self) {
        self.limiting.store(true, Ordering::Relaxed);
    }

    /// Call sites tracked so far.
    pub fn sites(&self) -> usize {
        (0..SHARDS).map(|i| self.shard(i).len()).sum()
    }

    /// Writes one line for each site with records dropped since its last
    /// line, in file order, and clears the counts.
    pub fn report_suppressed(&self) {
        let mut pending = Vec::new();
        for i in 0..SHARDS {
            for (key, site) in self.shard(i).iter_mut() {
                let n = std::mem::take(&mut site.suppressed);
                if n == 0 {
                    continue;
                }
                let (file, line) = match key {
                    SiteKey::Static { file, line } => (file.to_string(), *line),
                    SiteKey::Owned { file, line, .. } => (file.to_string(), *line),
                    SiteKey::Overflow => (String::new(), 0),
                };
                pending.push((file, line, site.level, site.target.clone(), n));
            }
        }
        pending.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (file, line, level, target, n) in pending {
            let place = match file.as_str() {
                "" => "other call sites".to_string(),
                _ => format!("{file}:{line}"),
            };
            self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "({n} similar messages suppressed since the last line from {place})"
                    ))
                    .level(level)
                    .target(&target)
                    .file((!file.is_empty()).then_some(file.as_str()))
                    .line((line != 0).then_some(line))
                    .build(),
            );
        }
    }

    fn shard(&self, index: usize) -> MutexGuard<'_, HashMap<SiteKey, Site>> {
        // The lock is never held across a call that could panic short of
        // an allocation failure; logging must not panic on top of that.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a token from the record's site, or counts the record dropped.
    fn admit(&self, record: &Record) -> Verdict {
        let now = self.clock.now_ns();
        let line = record.line().unwrap_or(0);
        let file = record.file().unwrap_or("");
        // Cheap and spreads sites well enough: only contention depends on it.
        let index = (line as usize).wrapping_add(file.len()) % SHARDS;
        let mut shard = self.shard(index);
        let key = match record.file_static() {
            Some(file) => SiteKey::Static { file, line },
            None => {
                let key = SiteKey::Owned {
                    target: record.target().into(),
                    file: file.into(),
                    line,
                };
                if shard.contains_key(&key) || self.claim_dynamic_site() {
                    key
                } else {
                    SiteKey::Overflow
                }
            }
        };
        let site = shard.entry(key).or_insert_with(|| Site {
            bucket: Bucket::default(),
            suppressed: 0,
            level: record.level(),
            target: record.target().into(),
        });
        if site.bucket.admit(now, &self.rate) {
            Verdict::Pass {
                suppressed: std::mem::take(&mut site.suppressed),
            }
        } else {
            site.suppressed += 1;
            Verdict::Drop
        }
    }

    /// Counts one more dynamic site, unless there are enough already.
    fn claim_dynamic_site(&self) -> bool {
        self.dynamic_sites
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_DYNAMIC_SITES).then_some(n + 1)
            })
            .is_ok()
    }
}

impl<L: Log, C: Clock> Log for RateLimitedLogger<L, C> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        // Filtered records neither take tokens nor touch the sites.
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if !self.limiting.load(Ordering::Relaxed) {
            self.inner.log(record);
            return;
        }
        match self.admit(record) {
            Verdict::Drop => {}
            Verdict::Pass { suppressed: 0 } => self.inner.log(record),
            Verdict::Pass { suppressed } => self.inner.log(
                &Record::builder()
                    .args(format_args!(
                        "{} ({suppressed} similar messages suppressed)",
                        record.args()
                    ))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    /// Writes the counts still pending (see
    /// [`report_suppressed`](RateLimitedLogger::report_suppressed)), then
    /// flushes `inner`.
    fn flush(&self) {
        self.report_suppressed();
        self.inner.flush();
    }
}
