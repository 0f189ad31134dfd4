//! Replicated volumes: block volumes whose data lives on N copies on
//! different nodes, the copies (not a controller, etcd or CRDs) being the
//! source of truth. This module is the logic without I/O that the data path
//! sits on: the record ([`record`]), how changes to it reach a majority and
//! how the owner's engine keeps its copies in sync ([`protocol`],
//! [`engine`]), and where copies go ([`placement`]). It never opens a
//! socket, a file or a FUSE session, and never reads a clock.
//!
//! # What each voter keeps
//! Every member is a voter: a *copy* (data and record) or, beside exactly
//! two copies, a *witness* (record only) on a third node, so that two copies
//! still have a majority of three voters. A voter keeps, durably, the
//! highest ballot it promised, the ballot at which it accepted its current
//! record, that record (members, in-sync copies with their boot, owner,
//! epoch, version) and its own boot counter. A copy also keeps the data; the
//! model tags each region with the write that last filled it.
//!
//! # Changing the record
//! A change (publish, unpublish, an engine starting, the in-sync set) is one
//! round of single-decree Paxos applied to a register, as in CASPaxos: the
//! proposer sends Prepare(b) to every voter; each voter whose promise is
//! below `b` promises `b` and returns its accepted ballot and record. On a
//! majority of promises the proposer takes the record accepted at the
//! highest ballot, checks it is still entitled to its change (ControllerPublish
//! is refused while another node owns the volume; an engine may change only
//! a record whose owner is its node and whose epoch is the one it holds,
//! otherwise it learns that it is fenced and stops), applies the change and
//! sends Accept(b, record) to every voter; the record is *chosen* once a
//! majority accepted it. A Nack or a timeout starts over with a higher
//! ballot after a jitter the caller draws. Ballots are (round, proposer id),
//! so no two proposers ever share one.
//!
//! # Why it is safe
//! If a record R is chosen at ballot b, every Accept at a ballot above b
//! carries a record built on R: the proposer's majority of promises meets
//! the majority that accepted R in at least one voter, which accepted R
//! before promising (after promising it would have refused b), so the
//! highest accepted ballot the proposer sees is at least b, and by
//! induction the record it builds on descends from R. Chosen records thus
//! form a single history (each change raises `version` by one, and two
//! different records are never chosen for one ballot or one version), and a
//! change applied to the newest record sees every earlier chosen change. A
//! chosen record may be installed on a lagging voter at its ballot (Commit,
//! Attach) without a promise: it is already on a majority, so it tells later
//! proposers nothing they would not learn anyway.
//!
//! # Fencing
//! ControllerPublish sets the owner and raises the epoch; an engine starting
//! raises it again to an epoch of its own. Every data request carries the
//! sender's epoch, and a copy serves it only when it equals the epoch of the
//! record the copy *accepted*: older is refused (fenced), newer is answered
//! "behind" so the engine sends the chosen record along. Promises play no
//! part: a fenced engine's Prepare cannot stop the rightful owner's writes.
//! A new engine attaches every in-sync copy at its epoch (installing the
//! record) and compares what they hold before it serves I/O, so writes the
//! old engine got onto some copies before they learned the new epoch are
//! rebuilt away rather than left on one copy only.
//!
//! # Writes, failures and rebuilds
//! A write goes to every in-sync copy (and to copies being rebuilt) and is
//! acknowledged once every in-sync copy has it; a copy that fails or times
//! out is first marked out of sync on a majority, then the write is
//! acknowledged. The engine keeps, per out-of-sync copy, the regions it may
//! lack: those written while it was out plus those it had not flushed. A
//! copy that restarts comes back under a new boot, which no record names,
//! so it is out of sync by construction. Rebuild copies each dirty region
//! from an in-sync copy while holding that region (user writes to it wait),
//! flushes the copy, and adds it to the in-sync set on a majority; from the
//! moment the change is proposed, writes wait for that copy too. A copy
//! joins only once every write an acknowledged flush covered is on its
//! stable storage (user flushes also go to copies being rebuilt; otherwise
//! it flushes again). Attaching a copy flushes it, so the engine's record of
//! unflushed regions is complete from then on.
//!
//! If every in-sync copy restarts while an engine runs, writes it
//! acknowledged but nobody flushed may be gone (as on a disk that lost
//! power): the engine stops and fails I/O. The next engine, once every
//! in-sync copy has answered under its new boot, makes one of them the only
//! in-sync copy (each holds every flushed write) and rebuilds the others
//! from it.
//!
//! # What the data path adds
//! Transport (TLS, deadlines), persisting [`protocol::VoterState`] before a
//! voter replies, the regions' bytes behind the tags, a per-region tag map
//! on each copy (or an equivalent log of regions written in the current
//! epoch) for the start-up comparison, and the FUSE/loop device in front of
//! the engine.

pub mod backend;
pub mod driver;
pub mod engine;
pub mod engines;
pub mod idle;
pub mod placement;
pub mod protocol;
pub mod record;
pub mod store;
pub mod wire;

/// The unit of dirty tracking, rebuild and write ordering: a volume is
/// split into regions of this many bytes (the last may be shorter).
pub const REGION_BYTES: u64 = 1 << 20;

/// How long one region takes at `rate` (bytes per second): the time
/// between two regions of a scrub pass or of a paced rebuild.
pub fn region_time(rate: u64) -> std::time::Duration {
    std::time::Duration::from_secs_f64(REGION_BYTES as f64 / rate.max(1) as f64)
}

/// When the next check of a copy (an engine's scrub pass, or a node's
/// read of a copy nobody publishes) is due, from how far the checks got
/// ([`protocol::CheckMark`]), for a volume of `regions` regions checked
/// every `every`, at `now` (seconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDue {
    /// A check stopped under way: it resumes at this region.
    Resume(protocol::Region),
    /// The last whole check ended less than `every` ago: the next is due
    /// after this.
    After(std::time::Duration),
    /// The last whole check ended `every` ago or more.
    Overdue,
    /// None ever reached the end.
    Never,
}

impl CheckDue {
    pub fn of(
        mark: protocol::CheckMark,
        regions: u64,
        now: u64,
        every: std::time::Duration,
    ) -> Self {
        if mark.next > 0 && u64::from(mark.next) < regions {
            return CheckDue::Resume(mark.next);
        }
        if mark.done == 0 {
            return CheckDue::Never;
        }
        // A clock of the copy's node ahead of this one's: no time passed.
        // A period ahead or more, it cannot be trusted (a mark that far in
        // the future would put every pass off while it lasts).
        if mark.done > now.saturating_add(every.as_secs()) {
            return CheckDue::Overdue;
        }
        let since = std::time::Duration::from_secs(now.saturating_sub(mark.done));
        match every.checked_sub(since) {
            Some(left) if !left.is_zero() => CheckDue::After(left),
            _ => CheckDue::Overdue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::protocol::CheckMark;
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_check_resumes_where_it_stopped_or_waits_out_the_period_from_the_last() {
        let every = Duration::from_secs(100);
        let due = |done, next| CheckDue::of(CheckMark { done, next }, 10, 1_000, every);
        assert_eq!(due(0, 0), CheckDue::Never);
        assert_eq!(due(0, 4), CheckDue::Resume(4));
        assert_eq!(due(990, 4), CheckDue::Resume(4));
        // Past the end (a mark of other size): a whole check.
        assert_eq!(due(990, 10), CheckDue::After(Duration::from_secs(90)));
        assert_eq!(due(0, 10), CheckDue::Never);
        assert_eq!(due(990, 0), CheckDue::After(Duration::from_secs(90)));
        assert_eq!(due(900, 0), CheckDue::Overdue);
        assert_eq!(due(5, 0), CheckDue::Overdue);
        // Done "later" than now by this clock.
        assert_eq!(due(1_050, 0), CheckDue::After(every));
        assert_eq!(due(1_100, 0), CheckDue::After(every));
        assert_eq!(due(1_101, 0), CheckDue::Overdue);
        assert_eq!(due(u64::MAX, 0), CheckDue::Overdue);
    }
}
