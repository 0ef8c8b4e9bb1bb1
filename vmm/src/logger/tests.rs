use super::*;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;

const SEC: u64 = 1_000_000_000;

/// The inner logger: keeps what reaches it, filtered at `max`.
struct Recorder {
    max: LevelFilter,
    lines: Mutex<Vec<(Level, String, String)>>,
}

impl Recorder {
    fn new(max: LevelFilter) -> Arc<Self> {
        Arc::new(Recorder {
            max,
            lines: Mutex::new(Vec::new()),
        })
    }

    fn texts(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines.iter().map(|(_, _, text)| text.clone()).collect()
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

impl Log for Recorder {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.max
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            self.lines.lock().unwrap().push((
                record.level(),
                record.target().to_string(),
                record.args().to_string(),
            ));
        }
    }

    fn flush(&self) {}
}

/// Time that only moves when a test says so.
#[derive(Clone, Default)]
struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::Relaxed);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

type Limited = RateLimitedLogger<Arc<Recorder>, FakeClock>;

/// A limiter with a burst of 3 and one token a second, already limiting,
/// over a recorder that passes `max`.
fn limited(max: LevelFilter) -> (Limited, Arc<Recorder>, FakeClock) {
    let recorder = Recorder::new(max);
    let clock = FakeClock::default();
    let limits = Limits {
        burst: 3,
        interval: Duration::from_secs(1),
    };
    let logger = RateLimitedLogger::new(Arc::clone(&recorder), clock.clone(), limits);
    logger.start_limiting();
    (logger, recorder, clock)
}

/// A record from call site `file:line`, as the `log` macros make them.
fn emit(logger: &impl Log, level: Level, file: &'static str, line: u32, text: &str) {
    logger.log(
        &Record::builder()
            .args(format_args!("{text}"))
            .level(level)
            .target("virtio_devices::queue")
            .module_path_static(Some("virtio_devices::queue"))
            .file_static(Some(file))
            .line(Some(line))
            .build(),
    );
}

fn warn_n(logger: &impl Log, line: u32, n: usize) {
    for i in 0..n {
        emit(
            logger,
            Level::Warn,
            "src/queue.rs",
            line,
            &format!("bad head {i}"),
        );
    }
}

#[test]
fn burst_passes_and_the_excess_is_dropped() {
    let (logger, rec, _) = limited(LevelFilter::Trace);
    warn_n(&logger, 10, 50);
    assert_eq!(rec.texts(), ["bad head 0", "bad head 1", "bad head 2"]);
}

#[test]
fn tokens_come_back_with_time() {
    let (logger, rec, clock) = limited(LevelFilter::Trace);
    warn_n(&logger, 10, 10);
    assert_eq!(rec.count(), 3);
    clock.advance(SEC - 1);
    warn_n(&logger, 10, 10);
    assert_eq!(rec.count(), 3, "less than an interval refills nothing");
    clock.advance(1);
    warn_n(&logger, 10, 10);
    assert_eq!(rec.count(), 4);
    // A long quiet spell refills the burst, no more.
    clock.advance(3600 * SEC);
    warn_n(&logger, 10, 10);
    assert_eq!(rec.count(), 7);
}

#[test]
fn the_next_line_says_how_many_were_dropped() {
    let (logger, rec, clock) = limited(LevelFilter::Trace);
    warn_n(&logger, 10, 145);
    clock.advance(SEC);
    emit(&logger, Level::Warn, "src/queue.rs", 10, "bad head again");
    emit(&logger, Level::Warn, "src/queue.rs", 10, "dropped");
    clock.advance(SEC);
    emit(&logger, Level::Warn, "src/queue.rs", 10, "and again");
    let texts = rec.texts();
    assert_eq!(
        texts[3..],
        [
            "bad head again (142 similar messages suppressed)",
            "and again (1 similar messages suppressed)",
        ]
    );
}

#[test]
fn call_sites_are_independent() {
    let (logger, rec, _) = limited(LevelFilter::Trace);
    warn_n(&logger, 10, 100);
    // Same line, other file; same file, other line.
    emit(&logger, Level::Warn, "src/other.rs", 10, "other file");
    emit(&logger, Level::Error, "src/queue.rs", 11, "other line");
    warn_n(&logger, 12, 5);
    let texts = rec.texts();
    assert_eq!(texts.len(), 3 + 1 + 1 + 3);
    assert_eq!(texts[3..5], ["other file", "other line"]);
    assert_eq!(logger.sites(), 4);
}

#[test]
fn level_filtering_is_untouched() {
    let (logger, rec, _) = limited(LevelFilter::Warn);
    for _ in 0..100 {
        emit(&logger, Level::Debug, "src/queue.rs", 10, "debug");
    }
    // Filtered records reach nobody and take no tokens or site entries.
    assert_eq!(rec.count(), 0);
    assert_eq!(logger.sites(), 0);
    assert!(!logger.enabled(&Metadata::builder().level(Level::Info).build()));
    assert!(logger.enabled(&Metadata::builder().level(Level::Error).build()));
    warn_n(&logger, 10, 10);
    assert_eq!(rec.count(), 3);
    // Nor do they add to the dropped count.
    logger.flush();
    assert_eq!(
        rec.texts().last().unwrap(),
        "(7 similar messages suppressed since the last line from src/queue.rs:10)"
    );
}

#[test]
fn nothing_is_limited_before_start_limiting() {
    let recorder = Recorder::new(LevelFilter::Trace);
    let logger = RateLimitedLogger::new(
        Arc::clone(&recorder),
        FakeClock::default(),
        Limits::default(),
    );
    // The topology at start-up: one line per function from one site.
    warn_n(&logger, 10, 100);
    assert_eq!(recorder.count(), 100);
    assert_eq!(logger.sites(), 0);
    logger.start_limiting();
    warn_n(&logger, 10, 100);
    assert_eq!(recorder.count(), 100 + 32);
}

#[test]
fn flush_reports_pending_counts_once() {
    let (logger, rec, clock) = limited(LevelFilter::Trace);
    warn_n(&logger, 20, 13);
    warn_n(&logger, 10, 4);
    warn_n(&logger, 30, 3);
    logger.flush();
    let texts = rec.texts();
    // In file and line order; the site with nothing dropped says nothing.
    assert_eq!(
        texts[9..],
        [
            "(1 similar messages suppressed since the last line from src/queue.rs:10)",
            "(10 similar messages suppressed since the last line from src/queue.rs:20)",
        ]
    );
    let (level, target, _) = rec.lines.lock().unwrap()[10].clone();
    assert_eq!(
        (level, target.as_str()),
        (Level::Warn, "virtio_devices::queue")
    );
    logger.flush();
    assert_eq!(rec.count(), 11, "counts are cleared once reported");
    // And the next line of a reported site carries no stale count.
    clock.advance(SEC);
    emit(&logger, Level::Warn, "src/queue.rs", 20, "later");
    assert_eq!(rec.texts().last().unwrap(), "later");
}

#[test]
fn concurrent_sites_count_every_record_once() {
    let (logger, rec, clock) = limited(LevelFilter::Trace);
    const THREADS: u32 = 8;
    const PER_THREAD: usize = 2_000;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let logger = &logger;
            s.spawn(move || {
                // Every thread hits the shared site and one of its own.
                for _ in 0..PER_THREAD {
                    emit(logger, Level::Warn, "src/shared.rs", 1, "shared");
                    emit(logger, Level::Warn, "src/own.rs", 100 + t, "own");
                }
            });
        }
    });
    let texts = rec.texts();
    let shared = texts.iter().filter(|t| *t == "shared").count();
    let own = texts.iter().filter(|t| *t == "own").count();
    assert_eq!((shared, own), (3, 3 * THREADS as usize));
    assert_eq!(logger.sites(), 1 + THREADS as usize);
    clock.advance(SEC);
    emit(&logger, Level::Warn, "src/shared.rs", 1, "shared");
    let dropped = THREADS as usize * PER_THREAD - 3;
    assert_eq!(
        rec.texts().last().unwrap(),
        &format!("shared ({dropped} similar messages suppressed)")
    );
}

#[test]
fn sites_without_static_names_are_bounded() {
    let (logger, rec, _) = limited(LevelFilter::Trace);
    // Records not made by the macros: file names that are not 'static.
    for i in 0..(MAX_DYNAMIC_SITES + 500) {
        let file = format!("gen/{i}.rs");
        for _ in 0..5 {
            logger.log(
                &Record::builder()
                    .args(format_args!("dynamic"))
                    .level(Level::Warn)
                    .target("bridge")
                    .file(Some(&file))
                    .line(Some(7))
                    .build(),
            );
        }
    }
    assert!(logger.sites() <= MAX_DYNAMIC_SITES + SHARDS);
    // Each tracked site passed its burst; the rest shared the overflow
    // buckets, each of which passed at most one burst.
    let passed = rec.count();
    assert!(passed >= 3 * MAX_DYNAMIC_SITES);
    assert!(passed <= 3 * (MAX_DYNAMIC_SITES + SHARDS));
    logger.flush();
    assert!(rec
        .texts()
        .iter()
        .any(|t| t.contains("from other call sites")));
}
