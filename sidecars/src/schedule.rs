//! Snapshot schedules: durations as people write them (`30s`, `6h`, `1d`),
//! the slot a moment falls in, the deterministic snapshot name for a slot,
//! and which recorded snapshots to prune. Pure functions, no I/O.

use crate::state::ScheduledSnapshot;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration {0:?}: expected a whole number followed by s, m, h or d (e.g. 6h)")]
    Malformed(String),
    #[error("duration {0:?}: must be at least 1s")]
    Zero(String),
    #[error("duration {0:?}: too long")]
    Overflow(String),
}

/// Parses `<digits><s|m|h|d>` into seconds (at least one).
pub fn parse_duration(input: &str) -> Result<u64, DurationError> {
    let s = input.trim();
    let unit = match s.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => return Err(DurationError::Malformed(input.to_owned())),
    };
    let digits = &s[..s.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::Malformed(input.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    let secs = n
        .checked_mul(unit)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| DurationError::Overflow(input.to_owned()))?;
    if secs == 0 {
        return Err(DurationError::Zero(input.to_owned()));
    }
    Ok(secs)
}

/// The start (unix seconds) of the slot `now` falls in:
/// `floor(now / every) * every`.
pub fn slot_start(now: u64, every: u64) -> u64 {
    now / every * every
}

/// The snapshot name for a volume's slot: `<volume>-<slot start>`. The
/// same slot always gives the same name, so a CreateSnapshot interrupted
/// by a crash is repeated with the same idempotency key.
pub fn snapshot_name(volume: &str, slot: u64) -> String {
    format!("{volume}-{slot}")
}

/// Whether a snapshot is due: none recorded yet, or the newest recorded
/// one is from a slot older than `slot`.
pub fn due(recorded: &[ScheduledSnapshot], slot: u64) -> bool {
    recorded
        .iter()
        .map(|s| s.slot)
        .max()
        .is_none_or(|n| n < slot)
}

/// The recorded snapshots to delete so that the newest `keep` remain,
/// oldest first.
pub fn to_prune(recorded: &[ScheduledSnapshot], keep: u32) -> Vec<ScheduledSnapshot> {
    let mut all = recorded.to_vec();
    all.sort_by(|a, b| a.slot.cmp(&b.slot).then_with(|| a.name.cmp(&b.name)));
    let excess = all.len().saturating_sub(keep as usize);
    all.truncate(excess);
    all
}

/// Seconds formatted with the largest unit that divides them (`21600` →
/// `6h`).
pub fn format_duration(secs: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(slot: u64) -> ScheduledSnapshot {
        ScheduledSnapshot {
            name: snapshot_name("v", slot),
            id: format!("id-{slot}"),
            slot,
            creation_time: None,
        }
    }

    #[test]
    fn durations_take_one_unit_and_at_least_a_second() {
        assert_eq!(parse_duration("1s"), Ok(1));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("6h"), Ok(21_600));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        for bad in ["", "h", "6", "6H", "1.5h", "-1h", "6 h", "1w", "1h30m"] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::Malformed(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero("0s".into())));
        assert!(matches!(
            parse_duration("99999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert_eq!(format_duration(21_600), "6h");
        assert_eq!(format_duration(90), "90s");
        assert_eq!(format_duration(86_400), "1d");
    }

    #[test]
    fn slots_are_aligned_to_the_period() {
        assert_eq!(slot_start(0, 60), 0);
        assert_eq!(slot_start(59, 60), 0);
        assert_eq!(slot_start(60, 60), 60);
        assert_eq!(slot_start(1_700_000_123, 3600), 1_699_999_200);
        assert_eq!(slot_start(17, 1), 17);
        assert_eq!(snapshot_name("pgdata", 3600), "pgdata-3600");
    }

    #[test]
    fn a_snapshot_is_due_once_per_slot() {
        assert!(due(&[], 100));
        assert!(due(&[snap(40), snap(60)], 120));
        assert!(!due(&[snap(40), snap(120)], 120));
        // A clock that went backwards takes nothing.
        assert!(!due(&[snap(180)], 120));
    }

    #[test]
    fn pruning_removes_the_oldest_beyond_keep() {
        let recorded = vec![snap(30), snap(10), snap(40), snap(20)];
        let gone: Vec<u64> = to_prune(&recorded, 2).iter().map(|s| s.slot).collect();
        assert_eq!(gone, vec![10, 20]);
        assert!(to_prune(&recorded, 4).is_empty());
        assert!(to_prune(&recorded, 9).is_empty());
        assert_eq!(to_prune(&recorded, 1).len(), 3);
    }
}
