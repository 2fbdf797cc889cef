//! Durations as the config file writes them: Go's `time.ParseDuration`
//! grammar (`168h`, `1h30m`, `1.5s`), kept from the old Go service's
//! `[jwt] time_to_live` so its configs keep working, and used by every
//! duration key of every layer's section. A leaf: it imports nothing of the
//! crate.

use std::time::Duration;

/// Parse a Go `time.ParseDuration` string: a sequence of decimal numbers,
/// each with an optional fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`,
/// `m`, `h`), e.g. `168h`, `1h30m`, `1.5s`; `0` alone is zero. Negative
/// durations are refused (none of ours can be negative).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    // Units in nanoseconds, longest names first so `ms` wins over `m`.
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err("negative duration".into());
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let int_part = &rest[..int_len];
        rest = &rest[int_len..];
        let mut frac_part = "";
        if let Some(r) = rest.strip_prefix('.') {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            frac_part = &r[..n];
            rest = &r[n..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return Err("expected a number like 168h or 1h30m".into());
        }
        let (unit, scale) = UNITS
            .iter()
            .filter(|(name, _)| rest.starts_with(name))
            .max_by_key(|(name, _)| name.len())
            .ok_or_else(|| "missing or unknown unit (ns, us, ms, s, m, h)".to_string())?;
        rest = &rest[unit.len()..];
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| "number too large".to_string())?
        };
        let mut value = int.checked_mul(*scale).ok_or("duration too large")?;
        // Fraction digits past nanosecond precision are dropped, as Go does.
        let mut place = *scale;
        for d in frac_part.bytes() {
            place /= 10;
            if place == 0 {
                break;
            }
            value += u128::from(d - b'0') * place;
        }
        total = total.checked_add(value).ok_or("duration too large")?;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| "duration too large")?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("168h"), Ok(Duration::from_secs(168 * 3600)));
        assert_eq!(d("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(d("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(d("2m3.5s"), Ok(Duration::from_millis(123_500)));
        assert_eq!(d("10us"), Ok(Duration::from_micros(10)));
        assert_eq!(d("10µs"), Ok(Duration::from_micros(10)));
        assert_eq!(d(".5h"), Ok(Duration::from_secs(1800)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        for bad in [
            "",
            "10",
            "h",
            "1x",
            "-1h",
            "1h-",
            "1.h2",
            "99999999999999999999999h",
        ] {
            assert!(d(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
