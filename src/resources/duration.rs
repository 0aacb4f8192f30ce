//! Durations as specs write them, Go style: `10m`, `1h30m`, `90s`, `500ms`. The CRD's patterns
//! ([`super::DURATION_PATTERN`], [`super::INTERVAL_PATTERN`]) accept the same texts as these parsers, so a
//! manifest that never met the API server (`bitsmith fetch`) is judged as the API server would.

use std::time::Duration;

/// A duration made of whole `h`, `m`, `s` and `ms` parts in any order, e.g. `1h30m` or `90s`.
pub fn parse(text: &str) -> Option<Duration> {
    parts(text)?.into_iter().try_fold(Duration::ZERO, |total, (n, unit)| total.checked_add(unit.times(n)?))
}

/// A `spec.interval`: `h`, `m` and `s` parts, each at most once and in that order, adding up to at least
/// [`super::MIN_INTERVAL`]. Returns the duration, or why it is not one.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let shape = || format!("{text:?} is not a duration like 10m, 1h or 1h30m");
    let parts = parts(text).ok_or_else(shape)?;
    let in_order = parts.windows(2).all(|w| w[0].1 < w[1].1);
    if !in_order || parts.iter().any(|(_, unit)| *unit == Unit::Milli) {
        return Err(shape());
    }
    let total = parse(text).ok_or_else(shape)?;
    if total < super::MIN_INTERVAL {
        return Err(format!("{text:?} is shorter than the minimum of 1m"));
    }
    Ok(total)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Unit {
    Hour,
    Minute,
    Second,
    Milli,
}

impl Unit {
    fn times(self, n: u64) -> Option<Duration> {
        let seconds = |per: u64| n.checked_mul(per).map(Duration::from_secs);
        match self {
            Unit::Hour => seconds(3600),
            Unit::Minute => seconds(60),
            Unit::Second => seconds(1),
            Unit::Milli => Some(Duration::from_millis(n)),
        }
    }
}

/// The `(number, unit)` parts of `text`, or `None` when it is not a sequence of them.
fn parts(text: &str) -> Option<Vec<(u64, Unit)>> {
    let mut rest = text;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Unit::Milli, 2)
        } else {
            match rest.bytes().next()? {
                b'h' => (Unit::Hour, 1),
                b'm' => (Unit::Minute, 1),
                b's' => (Unit::Second, 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        parts.push((number, unit));
    }
    (!parts.is_empty()).then_some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRD pattern, run as the API server runs it (a regex over the whole text), must agree with the parser.
    fn matches(pattern: &str, text: &str) -> bool {
        regex::Regex::new(pattern).unwrap().is_match(text)
    }

    #[test]
    fn durations_parse_as_the_pattern_says() {
        for (text, seconds) in [("10m", 600.0), ("1h30m", 5400.0), ("90s", 90.0), ("500ms", 0.5), ("1m1h", 3660.0)] {
            assert_eq!(parse(text), Some(Duration::from_secs_f64(seconds)), "{text}");
            assert!(matches(super::super::DURATION_PATTERN, text), "{text}");
        }
        for text in ["", "10", "m", "1.5h", "10 m", "-1s", "1d", "99999999999999999999h", "1h-"] {
            assert_eq!(parse(text), None, "{text}");
            if text != "99999999999999999999h" {
                assert!(!matches(super::super::DURATION_PATTERN, text), "{text}");
            }
        }
    }

    #[test]
    fn intervals_are_at_least_a_minute_and_the_pattern_agrees() {
        for good in ["1m", "60s", "0h1m", "1h", "10m", "1h30m", "2h0m0s", "100s", "0060s", "01m", "1m0s", "0h0m61s"] {
            assert!(parse_interval(good).is_ok(), "{good}");
            assert!(matches(super::super::INTERVAL_PATTERN, good), "{good}");
        }
        for bad in ["59s", "0m", "0h0m0s", "30s", "1m1h", "60000ms", "1h1h", "", "1", "0h59s", "10 m", "1.5m", "m"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
            assert!(!matches(super::super::INTERVAL_PATTERN, bad), "{bad}");
        }
        assert!(parse_interval("30s").unwrap_err().contains("minimum"));
    }
}
