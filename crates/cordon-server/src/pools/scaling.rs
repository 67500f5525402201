//! The autoscaling rule of one pool: how many warm sandboxes it should hold.

use std::time::Duration;

/// A pool's size bounds and spare target, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    /// Warm sandboxes kept on top of the recent demand.
    pub spare: u32,
}

/// A change of a pool's target size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub to: u32,
    pub reason: String,
}

/// What the target should be: the claims of the last window plus the spare target, within
/// the bounds. With the default one-minute window the demand is claims per minute.
pub fn desired(bounds: Bounds, demand_in_window: u32) -> u32 {
    demand_in_window
        .saturating_add(bounds.spare)
        .clamp(bounds.min, bounds.max.max(bounds.min))
}

/// The next target from the current one. Up at once when demand asks for more; down only
/// after `cooldown` without demand and without a change, so a lull between bursts keeps the
/// warm sandboxes.
pub fn next_target(
    bounds: Bounds,
    current: u32,
    demand_in_window: u32,
    window: Duration,
    quiet_for: Duration,
    cooldown: Duration,
) -> Option<Change> {
    let want = desired(bounds, demand_in_window);
    let why = || {
        format!(
            "{demand_in_window} claims in the last {} s + spare {}, within {}..={}",
            window.as_secs(),
            bounds.spare,
            bounds.min,
            bounds.max
        )
    };
    if want > current {
        return Some(Change {
            to: want,
            reason: format!("scale up: {}", why()),
        });
    }
    let outside_bounds = current > bounds.max.max(bounds.min);
    if want < current && (quiet_for >= cooldown || outside_bounds) {
        let reason = if outside_bounds {
            format!(
                "scale down: bounds changed to {}..={}",
                bounds.min, bounds.max
            )
        } else {
            format!("scale down after {} s idle: {}", cooldown.as_secs(), why())
        };
        return Some(Change { to: want, reason });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn follows_demand_within_bounds() {
        let bounds = Bounds {
            min: 1,
            max: 5,
            spare: 1,
        };
        assert_eq!(desired(bounds, 0), 1);
        assert_eq!(desired(bounds, 2), 3);
        assert_eq!(desired(bounds, 100), 5);
        let fixed = Bounds {
            min: 3,
            max: 3,
            spare: 0,
        };
        assert_eq!(desired(fixed, 0), 3);
        assert_eq!(desired(fixed, 9), 3);
    }

    #[test]
    fn scales_up_at_once_and_down_after_the_cooldown() {
        let bounds = Bounds {
            min: 1,
            max: 8,
            spare: 1,
        };
        let up = next_target(bounds, 1, 4, MINUTE, Duration::ZERO, MINUTE).unwrap();
        assert_eq!(up.to, 5);
        assert!(up.reason.starts_with("scale up"), "{}", up.reason);
        assert_eq!(
            next_target(bounds, 5, 0, MINUTE, Duration::from_secs(59), MINUTE),
            None
        );
        let down = next_target(bounds, 5, 0, MINUTE, MINUTE, MINUTE).unwrap();
        assert_eq!(down.to, 1);
        assert_eq!(next_target(bounds, 1, 0, MINUTE, MINUTE, MINUTE), None);
    }

    #[test]
    fn shrinks_at_once_when_the_bounds_shrink() {
        let bounds = Bounds {
            min: 0,
            max: 2,
            spare: 0,
        };
        let change = next_target(bounds, 6, 0, MINUTE, Duration::ZERO, MINUTE).unwrap();
        assert_eq!(change.to, 0);
    }
}
