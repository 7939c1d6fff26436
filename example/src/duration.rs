//! The command line's intervals: a Go duration (`500ms`, `10s`, `2m`, `1.5h`) or a bare integer
//! of seconds.
//!
//! Go durations are parsed by the relay's own parser ([`gocompat::parse_duration`]), so the
//! workspace has one. That is why this crate depends on the relay's library: the lightest way
//! to share it, as every build of these programs builds the relay too; the relay depends on this
//! crate only for its tests, a cycle cargo allows.

use std::time::Duration;

use xds_relay::config::gocompat;

/// Parses a Go duration, or a bare integer that counts seconds; surrounding whitespace is
/// ignored.
///
/// # Errors
///
/// A message naming the input when it is neither (empty, an unknown unit, negative, or out of
/// range).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(Duration::from_secs).map_err(|_| format!("duration {text:?} is too large"));
    }
    gocompat::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations_and_integer_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration(" 3s "), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for text in ["", " ", "s", "10x", "-1s", "soon", "99999999999999999999999"] {
            assert!(parse_duration(text).is_err(), "{text:?}");
        }
    }
}
