//! Go compatibility: Go duration strings (`time.ParseDuration` / `Duration.String`) and Go
//! RE2 regular expressions compiled with the `regex` crate.
//!
//! Invariants: every function here is total — no input panics, overflows or loops forever;
//! a duration that parses is never negative and fits in an `i64` of nanoseconds, as in Go.
//!
//! Durations are parsed here rather than with the `go-parse-duration` crate: version 0.1.1 of
//! that crate panics on non-ASCII units (`"1µs"`, `"1é"`), on sums that overflow (`debug`
//! builds), and never returns on fractions longer than 18 digits.

use std::time::Duration;

use regex::Regex;

// === durations ===

/// Nanoseconds per Go duration unit.
const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000), // U+00B5 micro sign
    ("μs", 1_000), // U+03BC Greek letter mu
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Fraction digits kept; further digits are below a nanosecond even for hours.
const MAX_FRACTION_DIGITS: usize = 20;

/// Parses a Go duration string such as `"300ms"`, `"1.5h"`, `"2h45m"` or `"0"`.
///
/// # Errors
///
/// A message of the form `invalid duration "<text>": <reason>` for malformed input, an
/// unknown unit, a value beyond Go's range (about 292 years), or a negative duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = |reason: &str| format!("invalid duration \"{text}\": {reason}");
    let mut s = text;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(fail("expected a number with a unit, such as 300ms, 1.5h or 2h45m"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        if !s.starts_with(|c: char| c == '.' || c.is_ascii_digit()) {
            return Err(fail("expected a number with a unit, such as 300ms, 1.5h or 2h45m"));
        }
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let int_digits = &s[..int_len];
        s = &s[int_len..];
        let mut fraction_digits = "";
        if let Some(rest) = s.strip_prefix('.') {
            let len = rest.bytes().take_while(u8::is_ascii_digit).count();
            fraction_digits = &rest[..len];
            s = &rest[len..];
        }
        if int_digits.is_empty() && fraction_digits.is_empty() {
            return Err(fail("expected digits before the unit"));
        }
        // The unit runs to the next digit or '.', both ASCII, so this is a char boundary.
        let unit_len = s.bytes().take_while(|b| *b != b'.' && !b.is_ascii_digit()).count();
        let unit_text = &s[..unit_len];
        s = &s[unit_len..];
        if unit_text.is_empty() {
            return Err(fail("missing unit (valid units are ns, us, µs, ms, s, m, h)"));
        }
        let Some(&(_, unit)) = UNITS.iter().find(|(name, _)| *name == unit_text) else {
            return Err(fail(&format!("unknown unit \"{unit_text}\" (valid units are ns, us, µs, ms, s, m, h)")));
        };
        let out_of_range = || fail("out of range");
        // 40 digits always overflow i64 nanoseconds, and keep the u128 arithmetic exact.
        if int_digits.len() > 38 {
            return Err(out_of_range());
        }
        let whole: u128 = if int_digits.is_empty() { 0 } else { int_digits.parse().map_err(|_| out_of_range())? };
        let mut part = whole.checked_mul(unit).ok_or_else(out_of_range)?;
        let kept = &fraction_digits[..fraction_digits.len().min(MAX_FRACTION_DIGITS)];
        if !kept.is_empty() {
            let fraction: u128 = kept.parse().map_err(|_| out_of_range())?;
            // kept.len() <= 20 so 10^len and fraction * unit (< 10^20 * 3.6e12) fit in u128.
            let scale = 10u128.pow(kept.len() as u32);
            part = part.checked_add(fraction * unit / scale).ok_or_else(out_of_range)?;
        }
        total = total.checked_add(part).ok_or_else(out_of_range)?;
        if total > i64::MAX as u128 {
            return Err(out_of_range());
        }
    }
    if negative && total > 0 {
        return Err(fail("must not be negative"));
    }
    // total <= i64::MAX, checked in the loop.
    Ok(Duration::from_nanos(total as u64))
}

/// Formats a duration the way Go's `Duration.String` does: `"0s"`, `"300ms"`, `"1.5µs"`,
/// `"30s"`, `"5m0s"`, `"1h30m0s"`.
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000_000_000 {
        let (unit, precision) = match nanos {
            0..1_000 => ("ns", 0),
            1_000..1_000_000 => ("µs", 3),
            _ => ("ms", 6),
        };
        let scale = 10u128.pow(precision);
        return format!("{}{}{unit}", nanos / scale, fraction(nanos % scale, precision as usize));
    }
    let seconds = nanos / 1_000_000_000;
    let frac = fraction(nanos % 1_000_000_000, 9);
    let (hours, minutes, secs) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{secs}{frac}s")
    } else if minutes > 0 {
        format!("{minutes}m{secs}{frac}s")
    } else {
        format!("{secs}{frac}s")
    }
}

/// `.ddd` with trailing zeros removed, or nothing when `value` is 0.
fn fraction(value: u128, precision: usize) -> String {
    if value == 0 {
        return String::new();
    }
    let digits = format!("{value:0precision$}");
    format!(".{}", digits.trim_end_matches('0'))
}

// === regular expressions ===

/// Compiles a Go RE2 regular expression with the `regex` crate, after
/// [`translate_regex`].
///
/// # Errors
///
/// The `regex` crate's error for a pattern invalid in both dialects.
pub fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&translate_regex(pattern))
}

/// The one-line reason of a regex error (the `error: …` line of a syntax error), suitable
/// after `invalid regex "…": `.
pub fn regex_error_reason(error: &regex::Error) -> String {
    match error {
        regex::Error::Syntax(text) => text
            .lines()
            .find_map(|line| line.trim().strip_prefix("error: "))
            .map_or_else(|| text.split_whitespace().collect::<Vec<_>>().join(" "), str::to_string),
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled regex is larger than the {limit} byte limit")
        }
        other => other.to_string().to_lowercase(),
    }
}

/// Rewrites the Go-only spellings of a Go RE2 pattern into what the `regex` crate accepts,
/// leaving everything else untouched. Go spellings the `regex` crate rejects or reads
/// differently:
///
/// - A `{` that does not start a repetition `{n}`, `{n,}` or `{n,m}` is a literal in Go
///   (`x{`, `a{,3}`, `{foo}`) and an error in `regex`: it becomes `\{`.
/// - `\Q…\E` quotes literal text in Go; `regex` has no such escape: the text is escaped.
/// - Inside a character class, Go reads `[` (other than `[:name:]`), `&` and `~` as
///   literals, while `regex` reads them as a nested class and set operations (`&&`, `~~`):
///   they are escaped.
///
/// Repetition of an empty assertion (`^*`, `$*`, `\b+`), which Go accepts and the shared
/// example uses (`^*-(.*)-*$`), needs no translation: `regex` 1.13 accepts it with the same
/// meaning. Perl classes (`\d`, `\w`, `\s`, `\b`) are ASCII in Go and Unicode-aware in
/// `regex`; this only matters for non-ASCII input and is left alone.
pub fn translate_regex(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i = copy_escape(&chars, i, &mut out, true),
            '[' => i = copy_class(&chars, i, &mut out),
            '{' => {
                if let Some(len) = repetition_len(&chars[i..]) {
                    out.extend(&chars[i..i + len]);
                    i += len;
                } else {
                    out.push_str("\\{");
                    i += 1;
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Copies the escape starting at `chars[start] == '\\'` and returns the index after it.
/// `\p{…}`, `\P{…}` and `\x{…}` are copied whole so their braces are not taken for
/// repetitions; at the top level `\Q…\E` becomes escaped literal text.
fn copy_escape(chars: &[char], start: usize, out: &mut String, top_level: bool) -> usize {
    let Some(&next) = chars.get(start + 1) else {
        out.push('\\'); // a trailing backslash: let the regex crate report it
        return start + 1;
    };
    if next == 'Q' && top_level {
        let body_start = start + 2;
        let mut end = body_start;
        while end < chars.len() && !(chars[end] == '\\' && chars.get(end + 1) == Some(&'E')) {
            end += 1;
        }
        let literal: String = chars[body_start..end].iter().collect();
        out.push_str(&regex::escape(&literal));
        return (end + 2).min(chars.len());
    }
    out.push('\\');
    out.push(next);
    let mut i = start + 2;
    if matches!(next, 'p' | 'P' | 'x') && chars.get(i) == Some(&'{') {
        while i < chars.len() {
            out.push(chars[i]);
            i += 1;
            if chars[i - 1] == '}' {
                break;
            }
        }
    }
    i
}

/// Copies the character class starting at `chars[start] == '['` and returns the index after
/// it, escaping what Go reads as literals but `regex` as class syntax.
fn copy_class(chars: &[char], start: usize, out: &mut String) -> usize {
    out.push('[');
    let mut i = start + 1;
    if chars.get(i) == Some(&'^') {
        out.push('^');
        i += 1;
    }
    // A ']' right after the opening (or after '^') is a literal in both dialects.
    if chars.get(i) == Some(&']') {
        out.push_str("\\]");
        i += 1;
    }
    while i < chars.len() {
        match chars[i] {
            ']' => {
                out.push(']');
                return i + 1;
            }
            '\\' => i = copy_escape(chars, i, out, false),
            '[' if chars.get(i + 1) == Some(&':') => {
                // A POSIX class [:name:] (or Go's literal '[' when unterminated).
                match (i + 2..chars.len().saturating_sub(1)).find(|&j| chars[j] == ':' && chars[j + 1] == ']') {
                    Some(end) => {
                        out.extend(&chars[i..end + 2]);
                        i = end + 2;
                    }
                    None => {
                        out.push_str("\\[");
                        i += 1;
                    }
                }
            }
            c @ ('[' | '&' | '~') => {
                out.push('\\');
                out.push(c);
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    i // unterminated class: let the regex crate report it
}

/// The length of a Go repetition `{n}`, `{n,}` or `{n,m}` at the start of `chars`, if any.
fn repetition_len(chars: &[char]) -> Option<usize> {
    let digits = |from: usize| chars[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let min = digits(1);
    if min == 0 {
        return None;
    }
    let mut i = 1 + min;
    if chars.get(i) == Some(&',') {
        i += 1;
        i += digits(i);
    }
    (chars.get(i) == Some(&'}')).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("+5s", ms(5_000)),
            ("0s", Duration::ZERO),
            ("300ms", ms(300)),
            ("0.5s", ms(500)),
            (".5s", ms(500)),
            ("1.s", ms(1_000)),
            ("120s", ms(120_000)),
            ("5m", ms(300_000)),
            ("1h30m", ms(5_400_000)),
            ("1.5h", ms(5_400_000)),
            ("2h45m0.5s", ms(9_900_500)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("10μs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            ("1.000000001s", Duration::from_nanos(1_000_000_001)),
            ("0.1234567890123456789012345s", Duration::from_nanos(123_456_789)),
            ("9223372036854775807ns", Duration::from_nanos(i64::MAX as u64)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_durations_without_panicking() {
        let cases = [
            ("", "expected a number"),
            ("-", "expected a number"),
            ("5", "missing unit"),
            ("5 minutes", "unknown unit \" minutes\""),
            ("5sec", "unknown unit \"sec\""),
            ("1é", "unknown unit \"é\""),
            ("s", "expected a number"),
            (".s", "expected digits"),
            ("1.5.5s", "missing unit"),
            ("-5s", "must not be negative"),
            ("9223372036854775808ns", "out of range"),
            ("4611686018427387904ns4611686018427387904ns", "out of range"),
            ("3000000h", "out of range"),
            ("99999999999999999999999999999999999999999h", "out of range"),
        ];
        for (text, reason) in cases {
            let err = parse_duration(text).unwrap_err();
            assert!(err.starts_with(&format!("invalid duration \"{text}\": ")), "{err}");
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::from_nanos(1_500), "1.5µs"),
            (ms(300), "300ms"),
            (Duration::from_micros(1_500), "1.5ms"),
            (ms(30_000), "30s"),
            (ms(500), "500ms"),
            (ms(1_500), "1.5s"),
            (ms(300_000), "5m0s"),
            (ms(5_400_000), "1h30m0s"),
            (Duration::from_nanos(3_600_000_000_001), "1h0m0.000000001s"),
        ];
        for (duration, want) in cases {
            assert_eq!(format_duration(duration), want);
            assert_eq!(parse_duration(want), Ok(duration), "round trip {want}");
        }
    }

    #[test]
    fn translates_go_only_regex_spellings() {
        let cases = [
            ("^*-(.*)-*$", "^*-(.*)-*$"),
            ("x{", "x\\{"),
            ("a{,3}", "a\\{,3}"),
            ("{foo}", "\\{foo}"),
            ("a{1,2", "a\\{1,2"),
            ("a{2}b{2,}c{2,5}", "a{2}b{2,}c{2,5}"),
            ("\\Qa.b\\E+", "a\\.b+"),
            ("\\Qa.b", "a\\.b"),
            ("[[]", "[\\[]"),
            ("[a&&b~~c]", "[a\\&\\&b\\~\\~c]"),
            ("[[:alpha:]]+", "[[:alpha:]]+"),
            ("[]a]", "[\\]a]"),
            ("[^]a]", "[^\\]a]"),
            ("\\p{Greek}{2}", "\\p{Greek}{2}"),
            ("\\x{41}{2}", "\\x{41}{2}"),
            ("[\\]{]", "[\\]{]"),
        ];
        for (go, want) in cases {
            assert_eq!(translate_regex(go), want, "{go}");
            assert!(compile_regex(go).is_ok(), "{go}");
        }
    }

    #[test]
    fn translated_regexes_behave_like_go() {
        let replace = |pattern: &str, input: &str, with: &str| {
            compile_regex(pattern).map(|re| re.replace_all(input, with).into_owned())
        };
        // Results Go's regexp.ReplaceAllString gives for the same inputs.
        assert_eq!(replace("^*-(.*)-*$", "staging-foo-bar", "$1").as_deref(), Ok("stagingfoo-bar"));
        assert_eq!(replace("^*-(.*)-*$", "staging", "$1").as_deref(), Ok("staging"));
        assert_eq!(replace("^(.*)-.*$", "staging-east", "$1").as_deref(), Ok("staging"));
        assert_eq!(replace("a*", "baaac", "X").as_deref(), Ok("XbXcX"));
        assert_eq!(replace("(a)", "a", "$1x|${1}x|$$").as_deref(), Ok("|ax|$"));
        assert_eq!(replace("x{", "ax{b", "-").as_deref(), Ok("a-b"));
        assert_eq!(replace("[a&&b]", "&", "-").as_deref(), Ok("-"));
        assert_eq!(replace("\\Q.*\\E", "a.*b", "-").as_deref(), Ok("a-b"));
    }

    #[test]
    fn invalid_regexes_report_one_line() {
        for pattern in ["(", "[a", "a)", "\\", "\\Z", "(?<"] {
            let err = compile_regex(pattern).unwrap_err();
            let reason = regex_error_reason(&err);
            assert!(!reason.is_empty() && !reason.contains('\n'), "{pattern}: {reason}");
        }
        let err = compile_regex("(").unwrap_err();
        assert_eq!(regex_error_reason(&err), "unclosed group");
        let err = compile_regex("a{1000}{1000}{1000}").unwrap_err();
        assert!(regex_error_reason(&err).contains("limit"), "{err}");
    }
}
