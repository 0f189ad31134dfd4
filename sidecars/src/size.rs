//! Byte sizes as people write them: `1Gi`, `512Mi`, `4096`. Binary suffixes
//! only (`Ki`, `Mi`, `Gi`, `Ti`); decimal ones are refused rather than guessed.

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size {0:?}: expected a number of bytes or a number with Ki, Mi, Gi or Ti")]
    Malformed(String),
    #[error("size {0:?}: too large")]
    Overflow(String),
    #[error("size {0:?}: must be greater than zero")]
    Zero(String),
}

const UNITS: [(&str, i64); 4] = [
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
];

/// Parses a positive size in bytes: plain digits, or digits followed by one
/// of `Ki`, `Mi`, `Gi`, `Ti`.
pub fn parse_size(input: &str) -> Result<i64, SizeError> {
    let s = input.trim();
    let (digits, unit) = UNITS
        .iter()
        .find_map(|(suffix, mult)| s.strip_suffix(suffix).map(|d| (d, *mult)))
        .unwrap_or((s, 1));
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Malformed(input.to_owned()));
    }
    let n: i64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_owned()))?;
    let bytes = n
        .checked_mul(unit)
        .ok_or_else(|| SizeError::Overflow(input.to_owned()))?;
    if bytes == 0 {
        return Err(SizeError::Zero(input.to_owned()));
    }
    Ok(bytes)
}

/// Formats bytes with the largest binary unit that divides them exactly
/// (`1073741824` → `1Gi`), or as plain bytes.
pub fn format_size(bytes: i64) -> String {
    if bytes != 0 {
        for (suffix, mult) in UNITS {
            if bytes % mult == 0 {
                return format!("{}{suffix}", bytes / mult);
            }
        }
    }
    bytes.to_string()
}

/// Formats bytes for people: in the largest binary unit not above them,
/// exactly when it divides them (`1073741824` → `1Gi`), otherwise rounded
/// to one decimal below ten units and to a whole number above
/// (`1020702720` → `973Mi`, `1610612736` → `1.5Gi`); below 1Ki, plain
/// bytes. For display only: [`format_size`] is the exact form.
pub fn human_size(bytes: i64) -> String {
    let sign = if bytes < 0 { "-" } else { "" };
    let abs = bytes.unsigned_abs();
    for (suffix, mult) in UNITS {
        let mult = mult as u64;
        if abs < mult {
            continue;
        }
        if abs.is_multiple_of(mult) {
            return format!("{sign}{}{suffix}", abs / mult);
        }
        let v = abs as f64 / mult as f64;
        return if v < 9.95 {
            format!("{sign}{v:.1}{suffix}")
        } else {
            format!("{sign}{v:.0}{suffix}")
        };
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_binary_suffixes_and_plain_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1Ki"), Ok(1024));
        assert_eq!(parse_size("64Mi"), Ok(64 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("2Ti"), Ok(2 << 40));
        assert_eq!(parse_size(" 3Gi "), Ok(3 << 30));
    }

    #[test]
    fn refuses_malformed_sizes() {
        for s in [
            "", "Gi", "1.5Gi", "-1Gi", "1GB", "1G", "1gi", "ten", "1 Gi", "+5",
        ] {
            assert_eq!(parse_size(s), Err(SizeError::Malformed(s.into())), "{s:?}");
        }
    }

    #[test]
    fn refuses_zero_and_overflow() {
        assert_eq!(parse_size("0"), Err(SizeError::Zero("0".into())));
        assert_eq!(parse_size("0Gi"), Err(SizeError::Zero("0Gi".into())));
        assert!(matches!(
            parse_size("9999999Ti"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_with_the_largest_exact_unit() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(1024), "1Ki");
        assert_eq!(format_size(3 << 30), "3Gi");
        assert_eq!(format_size((1 << 30) + (512 << 20)), "1536Mi");
    }

    #[test]
    fn human_sizes_round_to_the_largest_unit() {
        assert_eq!(human_size(996_780 << 10), "973Mi");
        assert_eq!(human_size((1 << 30) + (512 << 20)), "1.5Gi");
        assert_eq!(human_size(20 << 30), "20Gi");
        assert_eq!(human_size(1000), "1000");
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(1025), "1.0Ki");
        assert_eq!(human_size((10 << 30) - 1), "10Gi");
        assert_eq!(human_size(-(3 << 20)), "-3Mi");
    }

    #[test]
    fn format_then_parse_round_trips() {
        for b in [1i64, 1023, 1024, 5 << 20, 7 << 40, (1 << 30) + 1] {
            assert_eq!(parse_size(&format_size(b)), Ok(b));
        }
    }
}
