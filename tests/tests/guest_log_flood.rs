//! A guest repeating a bad request must not flood trellis' log: the test
//! guest's flood actions (`mode=hostile hostile_only=flood-`,
//! guest/src/hostile/flood.rs) make trellis log thousands of times from a
//! few call sites, in three crates and at warn, error and info level, and
//! say how many times in their TEST lines. Without the rate limit that is
//! 4200 lines; here each site may write its burst plus one line a second,
//! and for each site the lines written plus the suppressed counts they
//! carry (and the summary at exit) must add up to exactly what the guest
//! did: nothing dropped silently, nothing counted twice.
//!
//! Needs /dev/kvm and a trellis binary (see tests/src/guest_rig/mod.rs).

use std::path::Path;

use tests::guest_rig::{GuestRun, Outcome};
use vmm::logger::Limits;

/// One flooded call site: the target and a piece of the message it logs,
/// and the guest's TEST line and detail key that count its records.
struct Flood {
    target: &'static str,
    message: &'static str,
    test: &'static str,
    key: &'static str,
}

const FLOODS: &[Flood] = &[
    Flood {
        target: "virtio_devices::queue",
        message: "available ring names descriptor",
        test: "hostile-flood-avail-heads",
        key: "bad-heads=",
    },
    // The virtio-queue crate logs the same bad heads itself.
    Flood {
        target: "virtio_queue::queue",
        message: "attempted to add out of bounds descriptor",
        test: "hostile-flood-avail-heads",
        key: "bad-heads=",
    },
    Flood {
        target: "pci::bus",
        message: "failed to move BAR",
        test: "hostile-flood-bar-refused",
        key: "refused-moves=",
    },
    // Info level, from the binary's own target.
    Flood {
        target: "trellis::topology",
        message: "BAR 0 moved from",
        test: "hostile-flood-bar-moves",
        key: "moves=",
    },
];

/// Lines trellis writes besides the floods (topology, exit status).
const OTHER_LINES: usize = 20;

/// `(target, message)` of an env_logger line `[time LEVEL target] message`.
fn parse(line: &str) -> Option<(&str, &str)> {
    let (head, message) = line.strip_prefix('[')?.split_once("] ")?;
    Some((head.split_whitespace().last()?, message))
}

/// N in "... (N similar messages suppressed...".
fn suppressed(message: &str) -> Option<u64> {
    let (before, _) = message.split_once(" similar messages suppressed")?;
    before.rsplit_once('(')?.1.parse().ok()
}

fn count_from(out: &Outcome, flood: &Flood) -> u64 {
    let test = out.test(flood.test);
    test.detail
        .split(' ')
        .find_map(|w| w.strip_prefix(flood.key))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| out.fail(format!("no {} in {test:?}", flood.key)))
}

#[test]
fn a_log_flood_from_the_guest_is_bounded_and_counted() {
    let out = GuestRun::new(Path::new(env!("CARGO_TARGET_TMPDIR")), "log-flood")
        .cmdline("mode=hostile hostile_only=flood- expect=blk")
        .disk()
        .run();
    let tests: Vec<&str> = FLOODS.iter().map(|f| f.test).collect();
    out.assert_passed(&tests);

    let limits = Limits::default();
    let burst = u64::from(limits.burst);
    // Refills over the whole run, rounded up, plus one for the boundary.
    let refills = out.finished.elapsed.as_nanos() / limits.interval.as_nanos() + 2;
    let per_site = burst + u64::try_from(refills).unwrap();
    let lines: Vec<(&str, &str)> = out.finished.stderr.lines().filter_map(parse).collect();
    let mut flooded = 0;
    for flood in FLOODS {
        let events = count_from(&out, flood);
        // Enough that the bound below means something.
        out.check(
            events > 2 * per_site,
            format!("{}: only {events} records, no flood", flood.test),
        );
        flooded += events;
        let written: Vec<&str> = lines
            .iter()
            .filter(|(target, message)| *target == flood.target && message.contains(flood.message))
            .map(|(_, message)| *message)
            .collect();
        // At exit: "(N similar messages suppressed since the last line from file:line)".
        let summaries: Vec<&str> = lines
            .iter()
            .filter(|(target, message)| *target == flood.target && message.starts_with('('))
            .map(|(_, message)| *message)
            .collect();
        let dropped: u64 = written
            .iter()
            .chain(&summaries)
            .filter_map(|m| suppressed(m))
            .sum();
        let written = written.len() as u64;
        eprintln!(
            "{}: {events} records, {written} lines written, {dropped} suppressed",
            flood.target
        );
        out.check(
            written <= per_site,
            format!(
                "{}: {written} lines for {events} records, at most {per_site} expected",
                flood.target
            ),
        );
        out.check(
            summaries.len() <= 1,
            format!("{}: several summaries: {summaries:?}", flood.target),
        );
        out.check(
            written + dropped == events,
            format!(
                "{}: {written} lines + {dropped} suppressed, the guest caused {events}",
                flood.target
            ),
        );
    }
    let total = lines.len();
    let bound = FLOODS.len() * (per_site as usize + 1) + OTHER_LINES;
    eprintln!("stderr: {total} lines for {flooded} flood records (bound {bound})");
    out.check(
        total <= bound,
        format!("{total} lines on stderr, at most {bound} expected"),
    );
}
