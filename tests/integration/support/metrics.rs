//! Reading what a process exposes on `/metrics` (Prometheus text format).

/// The value of `series` (its name and labels as printed, e.g. `bitsmith_transfers_running` or
/// `bitsmith_objects{kind="Package",state="READY"}`) in `text`, if it is there.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
