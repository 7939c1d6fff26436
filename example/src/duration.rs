//! Parses the command line's intervals: `500ms`, `10s`, `2m`, or a bare integer of seconds.

use std::time::Duration;

/// Errors of [`parse_duration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDurationError {
    /// The text is empty.
    #[error("empty duration")]
    Empty,
    /// The number part is not a non-negative integer.
    #[error("invalid number in duration {input:?}")]
    Number {
        /// The whole input.
        input: String,
    },
    /// The suffix is not `ms`, `s` or `m`.
    #[error("unknown unit in duration {input:?}; use ms, s or m")]
    Unit {
        /// The whole input.
        input: String,
    },
    /// The duration does not fit.
    #[error("duration {input:?} is too large")]
    Overflow {
        /// The whole input.
        input: String,
    },
}

/// Parses `<integer>[ms|s|m]`; without a unit the integer counts seconds.
///
/// # Errors
///
/// [`ParseDurationError`] when the text is empty, the number is not an unsigned integer, the
/// unit is unknown, or the result overflows.
pub fn parse_duration(text: &str) -> Result<Duration, ParseDurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ParseDurationError::Empty);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| ParseDurationError::Number { input: text.to_owned() })?;
    let overflow = || ParseDurationError::Overflow { input: text.to_owned() };
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => number.checked_mul(60).map(Duration::from_secs).ok_or_else(overflow),
        _ => Err(ParseDurationError::Unit { input: text.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration(" 3s "), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_duration(""), Err(ParseDurationError::Empty));
        assert!(matches!(parse_duration("s"), Err(ParseDurationError::Number { .. })));
        assert!(matches!(parse_duration("1.5s"), Err(ParseDurationError::Unit { .. })));
        assert!(matches!(parse_duration("10h"), Err(ParseDurationError::Unit { .. })));
        assert!(matches!(parse_duration("-1s"), Err(ParseDurationError::Number { .. })));
    }
}
