//! Per-sandbox uid/gid ranges.
//!
//! Each sandbox maps its ids 0..65536 to its own host range. Ranges start well above the
//! ids a host hands to people and services (and above the usual `/etc/subuid` ranges), never
//! include host uid 0, and never overlap another sandbox that exists in the state dir.

/// Ids per sandbox.
pub(crate) const RANGE_SIZE: u32 = 65536;
/// First host id handed to sandboxes (2^30).
const FIRST_BASE: u32 = 1 << 30;
/// Last usable range ends below 2^32 - 1 (the kernel's "no id").
const SLOTS: u32 = ((u32::MAX - FIRST_BASE) / RANGE_SIZE) - 1;

/// The lowest range base not in `used`.
pub(crate) fn free_base(used: &[u32]) -> Option<u32> {
    (0..SLOTS)
        .map(|slot| FIRST_BASE + slot * RANGE_SIZE)
        .find(|base| !used.contains(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_lowest_free_range() {
        assert_eq!(free_base(&[]), Some(FIRST_BASE));
        assert_eq!(free_base(&[FIRST_BASE]), Some(FIRST_BASE + RANGE_SIZE));
        assert_eq!(free_base(&[FIRST_BASE + RANGE_SIZE]), Some(FIRST_BASE));
        let last = FIRST_BASE + (SLOTS - 1) * RANGE_SIZE;
        assert!(u64::from(last) + u64::from(RANGE_SIZE) < u64::from(u32::MAX));
    }
}
