//! Service metrics and their Prometheus text rendering (`GET /metrics`).
//!
//! Labels are route templates, methods, statuses and operation names only:
//! never a VM, snapshot, disk or user name, so the series count is bounded
//! and the page leaks nothing about the node. Counters are cheap atomics or
//! short mutex sections; rendering is rare.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the snapshot operation histogram: clones of big
/// disks take seconds to minutes, gets take milliseconds.
const OP_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; OP_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Every metric of the service.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    response_bytes: Mutex<BTreeMap<&'static str, u64>>,
    login_failures: Mutex<BTreeMap<&'static str, u64>>,
    snapshot_ops: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
    streams_in_flight: AtomicI64,
    connections_open: AtomicI64,
    /// TLS connections accepted since start (the memory trimmer's sign of
    /// activity, `server::trim_memory`).
    connections_accepted: AtomicU64,
    /// Times the allocator was trimmed, by reason (`burst`, `idle`).
    allocator_trims: Mutex<BTreeMap<&'static str, u64>>,
    connections_refused: Mutex<BTreeMap<&'static str, u64>>,
    connections_cut: Mutex<BTreeMap<&'static str, u64>>,
    /// HTTP/2 streams reset by their connection's watchdog.
    streams_reset: AtomicU64,
    /// The checks of the last `GET /health` or `/metrics` ([`super::health`]).
    health: Mutex<Vec<crate::wire::HealthCheck>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay meaningful after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// One finished request: its route template (or `unmatched`), method,
    /// status and the body bytes sent.
    pub fn request(&self, route: &'static str, method: &'static str, status: u16, bytes: u64) {
        *lock(&self.requests)
            .entry((route, method, status))
            .or_default() += 1;
        *lock(&self.response_bytes).entry(route).or_default() += bytes;
    }

    /// A refused login, by reason (`rejected`, `rate_limited`, ...).
    pub fn login_failure(&self, reason: &'static str) {
        *lock(&self.login_failures).entry(reason).or_default() += 1;
    }

    /// A snapshot operation (`create`, `delete`, `purge`, `get`, `diff`,
    /// `list`) with its outcome (`ok` or `error`) and duration.
    pub fn snapshot_op(&self, op: &'static str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        let mut ops = lock(&self.snapshot_ops);
        let h = ops.entry((op, outcome)).or_default();
        let secs = took.as_secs_f64();
        for (i, bound) in OP_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn stream_started(&self) {
        self.streams_in_flight.fetch_add(1, Ordering::Relaxed);
    }
    pub fn stream_ended(&self) {
        self.streams_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_accepted.fetch_add(1, Ordering::Relaxed);
    }
    /// TLS connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }
    /// Disk downloads being streamed now.
    pub fn streams_in_flight(&self) -> i64 {
        self.streams_in_flight.load(Ordering::Relaxed)
    }
    /// The allocator was trimmed (`burst` or `idle`, `server::trim_memory`).
    pub fn allocator_trimmed(&self, reason: &'static str) {
        *lock(&self.allocator_trims).entry(reason).or_default() += 1;
    }
    /// TLS connections open now.
    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Ordering::Relaxed)
    }
    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
    /// A connection closed at accept by the connection budget, by reason
    /// (`max_connections`, `per_address`, `reserved`).
    pub fn connection_refused(&self, reason: &'static str) {
        *lock(&self.connections_refused).entry(reason).or_default() += 1;
    }
    /// A connection cut by its watchdog (`send_timeout`, `idle`).
    pub fn connection_cut(&self, reason: &'static str) {
        *lock(&self.connections_cut).entry(reason).or_default() += 1;
    }
    /// An HTTP/2 stream reset by its connection's watchdog (its client
    /// kept the stream's window shut for `send_timeout`); the connection
    /// and its other streams go on.
    pub fn stream_reset(&self) {
        self.streams_reset.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps the checks of a health answer for the `coe_health_check`
    /// gauges.
    pub fn set_health(&self, checks: &[crate::wire::HealthCheck]) {
        *lock(&self.health) = checks.to_vec();
    }

    /// The Prometheus text exposition format (version 0.0.4), with the io
    /// core's read-ahead counters and the refinement counters of exact
    /// deltas.
    pub fn render(
        &self,
        prefetch: crate::io::prefetch::PrefetchStats,
        exact: crate::snapshot::exact::ExactStats,
    ) -> String {
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = self.render_into(&mut out);
        let _ = render_prefetch(&mut out, prefetch);
        let _ = render_exact(&mut out, exact);
        let _ = render_health(&mut out, &lock(&self.health));
        out
    }

    fn render_into(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP coe_http_requests_total HTTP requests by route template, method and status."
        )?;
        writeln!(out, "# TYPE coe_http_requests_total counter")?;
        for ((route, method, status), n) in lock(&self.requests).iter() {
            writeln!(
                out,
                "coe_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP coe_http_response_bytes_total Response body bytes sent, by route template."
        )?;
        writeln!(out, "# TYPE coe_http_response_bytes_total counter")?;
        for (route, n) in lock(&self.response_bytes).iter() {
            writeln!(
                out,
                "coe_http_response_bytes_total{{route=\"{route}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP coe_login_failures_total Refused logins by reason."
        )?;
        writeln!(out, "# TYPE coe_login_failures_total counter")?;
        for (reason, n) in lock(&self.login_failures).iter() {
            writeln!(out, "coe_login_failures_total{{reason=\"{reason}\"}} {n}")?;
        }
        writeln!(
            out,
            "# HELP coe_snapshot_operation_seconds Snapshot operations by kind and outcome."
        )?;
        writeln!(out, "# TYPE coe_snapshot_operation_seconds histogram")?;
        for ((op, outcome), h) in lock(&self.snapshot_ops).iter() {
            let labels = format!("op=\"{op}\",outcome=\"{outcome}\"");
            for (bound, n) in OP_BUCKETS.iter().zip(h.buckets) {
                writeln!(
                    out,
                    "coe_snapshot_operation_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                )?;
            }
            writeln!(
                out,
                "coe_snapshot_operation_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            )?;
            writeln!(
                out,
                "coe_snapshot_operation_seconds_sum{{{labels}}} {}",
                h.sum
            )?;
            writeln!(
                out,
                "coe_snapshot_operation_seconds_count{{{labels}}} {}",
                h.count
            )?;
        }
        writeln!(
            out,
            "# HELP coe_disk_streams_in_flight Disk downloads being streamed now."
        )?;
        writeln!(out, "# TYPE coe_disk_streams_in_flight gauge")?;
        writeln!(
            out,
            "coe_disk_streams_in_flight {}",
            self.streams_in_flight.load(Ordering::Relaxed)
        )?;
        writeln!(out, "# HELP coe_connections_open TLS connections open now.")?;
        writeln!(out, "# TYPE coe_connections_open gauge")?;
        writeln!(
            out,
            "coe_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "# HELP coe_connections_refused_total Connections closed at accept by the connection budget, by reason."
        )?;
        writeln!(out, "# TYPE coe_connections_refused_total counter")?;
        for (reason, n) in lock(&self.connections_refused).iter() {
            writeln!(
                out,
                "coe_connections_refused_total{{reason=\"{reason}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "# HELP coe_connections_cut_total Connections cut by their watchdog (send_timeout, idle)."
        )?;
        writeln!(out, "# TYPE coe_connections_cut_total counter")?;
        for (reason, n) in lock(&self.connections_cut).iter() {
            writeln!(out, "coe_connections_cut_total{{reason=\"{reason}\"}} {n}")?;
        }
        writeln!(
            out,
            "# HELP coe_allocator_trims_total Times the allocator's free memory was handed back \
             to the kernel, by reason (burst: a burst of connections went; idle: no new \
             connection for a while)."
        )?;
        writeln!(out, "# TYPE coe_allocator_trims_total counter")?;
        for (reason, n) in lock(&self.allocator_trims).iter() {
            writeln!(out, "coe_allocator_trims_total{{reason=\"{reason}\"}} {n}")?;
        }
        writeln!(
            out,
            "# HELP coe_http2_streams_reset_total HTTP/2 streams reset by their connection's \
             watchdog (window shut for send_timeout), the connection kept."
        )?;
        writeln!(out, "# TYPE coe_http2_streams_reset_total counter")?;
        writeln!(
            out,
            "coe_http2_streams_reset_total {}",
            self.streams_reset.load(Ordering::Relaxed)
        )?;
        Ok(())
    }
}

/// The read-ahead across requests (`crate::io::prefetch`): how many reads
/// were started ahead, how many a following request used, and the buffers
/// parked now.
fn render_prefetch(out: &mut String, p: crate::io::prefetch::PrefetchStats) -> std::fmt::Result {
    use std::fmt::Write;
    for (name, kind, help, v) in [
        (
            "coe_io_prefetch_reads_total",
            "counter",
            "Reads started ahead of a request expected to continue a sequential read.",
            p.parked,
        ),
        (
            "coe_io_prefetch_used_total",
            "counter",
            "Reads started ahead that the following request used.",
            p.adopted,
        ),
        (
            "coe_io_prefetch_buffers",
            "gauge",
            "Buffers held by reads started ahead, now.",
            p.buffers as u64,
        ),
        (
            "coe_io_buffers_in_use",
            "gauge",
            "Shared read buffers handed out now (io.pool_buffers at most).",
            p.pool_in_use as u64,
        ),
        (
            "coe_io_overflow_buffers_in_use",
            "gauge",
            "Read buffers made beyond the pool now, for streams that held none (io.overflow_buffers at most).",
            p.overflow_in_use as u64,
        ),
        (
            "coe_io_owner_waits_total",
            "counter",
            "Disk streams that waited because the other streams of their client address held io.owner_buffers.",
            p.owner_waits,
        ),
    ] {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} {kind}")?;
        writeln!(out, "{name} {v}")?;
    }
    Ok(())
}

/// Refinement by content of diffs (exact deltas, `snapshot::exact`): what
/// it read, what it cost and the data bytes it took out of the answers.
fn render_exact(out: &mut String, e: crate::snapshot::exact::ExactStats) -> std::fmt::Result {
    writeln!(
        out,
        "# HELP coe_exact_refining Diffs being refined by content now (4 at most)."
    )?;
    writeln!(out, "# TYPE coe_exact_refining gauge")?;
    writeln!(out, "coe_exact_refining {}", e.refining)?;
    for (name, help, v) in [
        (
            "coe_exact_diffs_total",
            "Disk diffs refined by content (exact deltas).",
            e.diffs.to_string(),
        ),
        (
            "coe_exact_cancelled_total",
            "Refinements stopped because their client went away.",
            e.cancelled.to_string(),
        ),
        (
            "coe_exact_candidate_bytes_total",
            "Bytes of changed ranges compared by content, each read from both snapshots.",
            e.candidate_bytes.to_string(),
        ),
        (
            "coe_exact_bytes_saved_total",
            "Data bytes the extent maps reported changed that refinement by content found unchanged or all-zero.",
            e.bytes_saved.to_string(),
        ),
        (
            "coe_exact_seconds_total",
            "Time spent refining diffs by content (reads and compares).",
            e.seconds.to_string(),
        ),
    ] {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} counter")?;
        writeln!(out, "{name} {v}")?;
    }
    Ok(())
}

/// A label value: quotes, backslashes and newlines escaped, cut short.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len().min(120));
    for c in v.chars().take(120) {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The health checks as gauges: 1 passing, 0 failing, with the reason of a
/// failing one as a label (the same states `GET /health` answers).
fn render_health(out: &mut String, checks: &[crate::wire::HealthCheck]) -> std::fmt::Result {
    writeln!(
        out,
        "# HELP coe_up 1 when every health check passes (GET /health answers 200)."
    )?;
    writeln!(out, "# TYPE coe_up gauge")?;
    writeln!(out, "coe_up {}", u8::from(checks.iter().all(|c| c.ok)))?;
    writeln!(
        out,
        "# HELP coe_health_check Health checks by component (store, io, repository), id and check; 1 passing."
    )?;
    writeln!(out, "# TYPE coe_health_check gauge")?;
    for c in checks {
        write!(
            out,
            "coe_health_check{{component=\"{}\",id=\"{}\",check=\"{}\"",
            label(&c.component),
            label(c.id.as_deref().unwrap_or("")),
            label(&c.check)
        )?;
        if let Some(r) = &c.reason {
            write!(out, ",reason=\"{}\"", label(r))?;
        }
        writeln!(out, "}} {}", u8::from(c.ok))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("/api/v1/vms", "GET", 200, 10);
        m.request("/api/v1/vms", "GET", 200, 5);
        m.login_failure("rejected");
        m.snapshot_op("create", true, Duration::from_millis(700));
        m.stream_started();
        let text = m.render(
            crate::io::prefetch::PrefetchStats {
                parked: 12,
                adopted: 9,
                buffers: 3,
                ..Default::default()
            },
            crate::snapshot::exact::ExactStats {
                diffs: 2,
                cancelled: 1,
                refining: 1,
                candidate_bytes: 1 << 20,
                bytes_saved: 917_504,
                seconds: 0.25,
            },
        );
        assert!(text.contains(
            "coe_http_requests_total{route=\"/api/v1/vms\",method=\"GET\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("coe_http_response_bytes_total{route=\"/api/v1/vms\"} 15\n"));
        assert!(text.contains("coe_login_failures_total{reason=\"rejected\"} 1\n"));
        assert!(text.contains(
            "coe_snapshot_operation_seconds_bucket{op=\"create\",outcome=\"ok\",le=\"0.5\"} 0\n"
        ));
        assert!(text.contains(
            "coe_snapshot_operation_seconds_bucket{op=\"create\",outcome=\"ok\",le=\"1\"} 1\n"
        ));
        assert!(text.contains("coe_disk_streams_in_flight 1\n"));
        assert!(text.contains("coe_io_prefetch_reads_total 12\n"));
        assert!(text.contains("coe_io_prefetch_used_total 9\n"));
        assert!(text.contains("# TYPE coe_io_prefetch_buffers gauge\ncoe_io_prefetch_buffers 3\n"));
        assert!(text.contains("coe_up 1\n"), "{text}");
        assert!(text.contains("coe_exact_diffs_total 2\n"));
        assert!(text.contains("coe_exact_cancelled_total 1\n"));
        assert!(text.contains("# TYPE coe_exact_refining gauge\ncoe_exact_refining 1\n"));
        assert!(text.contains("coe_exact_candidate_bytes_total 1048576\n"));
        assert!(text.contains(
            "# TYPE coe_exact_bytes_saved_total counter\ncoe_exact_bytes_saved_total 917504\n"
        ));
        assert!(text.contains("coe_exact_seconds_total 0.25\n"));
    }

    #[test]
    fn health_checks_render_as_gauges_with_their_reason() {
        use crate::wire::HealthCheck;
        let m = Metrics::default();
        m.set_health(&[
            HealthCheck::new("store", None, "writable", true, None),
            HealthCheck::new(
                "repository",
                Some("r1"),
                "readable",
                false,
                Some("Input/output error \"x\"".into()),
            ),
        ]);
        let text = m.render(
            crate::io::prefetch::PrefetchStats::default(),
            crate::snapshot::exact::ExactStats::default(),
        );
        assert!(text.contains("coe_up 0\n"), "{text}");
        assert!(
            text.contains("coe_health_check{component=\"store\",id=\"\",check=\"writable\"} 1\n")
        );
        assert!(text.contains(
            "coe_health_check{component=\"repository\",id=\"r1\",check=\"readable\",reason=\"Input/output error \\\"x\\\"\"} 0\n"
        ), "{text}");
    }
}
