//! The rollout's decisions, as pure functions over counts: which wave each device is in, when a
//! wave opens, when the rollout halts or completes. No I/O, no clock: the depot feeds counts in
//! and stores what comes out, in the same transaction as the report that changed them.
//!
//! The rules (`ota/FORMAT.md`, "Rollout plans"):
//! - wave `i + 1` opens once the devices that committed in waves `0..=i` reach
//!   `success_threshold` percent of those waves' devices (rounded up);
//! - the rollout halts as soon as, among the terminal reports since it last ran (published or
//!   resumed), failures pass `error_threshold` percent, counted once `min_reports` reported;
//! - a halted or aborted rollout opens nothing and offers nothing; only an operator resumes it;
//! - it is completed when every wave is open and every device in it reported; a device that
//!   enrolls later joins the last wave and makes it running again.

use depot_proto::wire::RolloutState;
use ota_bundle::Plan;

/// One wave's devices and their terminal reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveCount {
    pub size: u32,
    pub committed: u32,
    pub failed: u32,
}

impl WaveCount {
    pub fn pending(&self) -> u32 {
        self.size.saturating_sub(self.committed + self.failed)
    }
}

/// Terminal reports counted by the error gate: those since the rollout last ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    pub reported: u32,
    pub failed: u32,
}

/// A rollout's state as stored: what the gates decide from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: RolloutState,
    /// Waves open (from 1: the first opens at publish).
    pub open: usize,
    pub reason: Option<String>,
}

/// Applies the gates to `progress` after a change in the counts. Idempotent: deciding again
/// on the same counts changes nothing.
pub fn decide(plan: &Plan, waves: &[WaveCount], recent: Recent, progress: &Progress) -> Progress {
    let mut next = progress.clone();
    match progress.state {
        RolloutState::Halted | RolloutState::Aborted => return next,
        RolloutState::Running | RolloutState::Completed => {}
    }
    next.state = RolloutState::Running;
    if recent.reported >= plan.min_reports
        && u64::from(recent.failed) * 100
            > u64::from(plan.error_threshold) * u64::from(recent.reported)
    {
        next.state = RolloutState::Halted;
        next.reason = Some(format!(
            "{} of {} reports failed, over the error threshold of {}%",
            recent.failed, recent.reported, plan.error_threshold
        ));
        return next;
    }
    while next.open < waves.len() {
        let before = &waves[..next.open];
        let size: u64 = before.iter().map(|w| u64::from(w.size)).sum();
        let committed: u64 = before.iter().map(|w| u64::from(w.committed)).sum();
        if committed * 100 < size * u64::from(plan.success_threshold) {
            break;
        }
        next.open += 1;
    }
    if next.open == waves.len() && waves.iter().all(|w| w.pending() == 0) {
        next.state = RolloutState::Completed;
    }
    next
}

/// The rank of a device in a rollout's wave order: BLAKE3 of the rollout's key (its plan's
/// document id) and the device id. Stable for the rollout, different for the next one, and not
/// chosen by the device.
fn rank(rollout_key: &str, device: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(rollout_key.as_bytes());
    hasher.update(b"\0");
    hasher.update(device.as_bytes());
    *hasher.finalize().as_bytes()
}

/// Each device's wave (from 0), for the fleet known at publish time, in the order given.
pub fn assign(plan: &Plan, rollout_key: &str, devices: &[String]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..devices.len()).collect();
    order.sort_by_cached_key(|&i| rank(rollout_key, &devices[i]));
    let cover = plan.cover(devices.len() as u32);
    let mut waves = vec![0; devices.len()];
    for (position, &i) in order.iter().enumerate() {
        waves[i] = cover
            .iter()
            .position(|&c| (position as u32) < c)
            .unwrap_or(cover.len() - 1);
    }
    waves
}

#[cfg(test)]
mod tests {
    use ota_bundle::Wave;

    use super::*;

    fn plan(waves: &str, success: u8, error: u8, min_reports: u32) -> Plan {
        let waves = waves.split(',').map(|w| Wave::parse(w).unwrap()).collect();
        Plan::new(
            "quote-edge",
            &"a".repeat(64),
            "2.0.0",
            waves,
            success,
            error,
            min_reports,
        )
        .unwrap()
    }

    fn running(open: usize) -> Progress {
        Progress {
            state: RolloutState::Running,
            open,
            reason: None,
        }
    }

    fn counts(list: &[(u32, u32, u32)]) -> Vec<WaveCount> {
        list.iter()
            .map(|&(size, committed, failed)| WaveCount {
                size,
                committed,
                failed,
            })
            .collect()
    }

    #[test]
    fn a_wave_opens_only_once_the_waves_before_it_met_the_success_threshold() {
        let plan = plan("1,25%,100%", 90, 10, 1);
        let none = Recent::default();
        // 12 devices: 1, 2, 9. Nothing reported: only the canary's wave is open.
        let waves = counts(&[(1, 0, 0), (2, 0, 0), (9, 0, 0)]);
        assert_eq!(decide(&plan, &waves, none, &running(1)), running(1));
        // The canary committed: wave 1 opens, not wave 2.
        let waves = counts(&[(1, 1, 0), (2, 0, 0), (9, 0, 0)]);
        let ok = Recent {
            reported: 1,
            failed: 0,
        };
        assert_eq!(decide(&plan, &waves, ok, &running(1)), running(2));
        // One of wave 1's two committed: 2 of 3 is under 90%.
        let waves = counts(&[(1, 1, 0), (2, 1, 0), (9, 0, 0)]);
        let ok = Recent {
            reported: 2,
            failed: 0,
        };
        assert_eq!(decide(&plan, &waves, ok, &running(2)), running(2));
        let waves = counts(&[(1, 1, 0), (2, 2, 0), (9, 0, 0)]);
        let ok = Recent {
            reported: 3,
            failed: 0,
        };
        assert_eq!(decide(&plan, &waves, ok, &running(2)), running(3));
        // Everyone reported: completed; deciding again changes nothing.
        let waves = counts(&[(1, 1, 0), (2, 2, 0), (9, 9, 0)]);
        let ok = Recent {
            reported: 12,
            failed: 0,
        };
        let done = decide(&plan, &waves, ok, &running(3));
        assert_eq!(done.state, RolloutState::Completed);
        assert_eq!(decide(&plan, &waves, ok, &done), done);
        // A device enrolled since joins the last wave: running again.
        let waves = counts(&[(1, 1, 0), (2, 2, 0), (10, 9, 0)]);
        assert_eq!(decide(&plan, &waves, ok, &done), running(3));
    }

    #[test]
    fn a_failed_canary_halts_the_rollout_before_any_other_wave_opens() {
        let plan = plan("1,25%,100%", 90, 10, 1);
        let waves = counts(&[(1, 0, 1), (2, 0, 0), (9, 0, 0)]);
        let bad = Recent {
            reported: 1,
            failed: 1,
        };
        let halted = decide(&plan, &waves, bad, &running(1));
        assert_eq!((halted.state, halted.open), (RolloutState::Halted, 1));
        assert_eq!(
            halted.reason.as_deref(),
            Some("1 of 1 reports failed, over the error threshold of 10%")
        );
        // Halted stays halted whatever the counts say, until an operator resumes it.
        let waves = counts(&[(1, 1, 0), (2, 0, 0), (9, 0, 0)]);
        assert_eq!(decide(&plan, &waves, Recent::default(), &halted), halted);
    }

    #[test]
    fn the_error_gate_waits_for_min_reports_and_counts_strictly_over_the_threshold() {
        let plan = plan("10%,100%", 50, 20, 5);
        let waves = counts(&[(10, 3, 1), (90, 0, 0)]);
        // 1 of 4 failed, but only 4 reported: no halt yet (and 3 of 10 is under 50%).
        let recent = Recent {
            reported: 4,
            failed: 1,
        };
        assert_eq!(decide(&plan, &waves, recent, &running(1)), running(1));
        // 1 of 5 is exactly 20%: not over it.
        let waves = counts(&[(10, 4, 1), (90, 0, 0)]);
        let recent = Recent {
            reported: 5,
            failed: 1,
        };
        assert_eq!(decide(&plan, &waves, recent, &running(1)), running(1));
        // 2 of 6 is over it.
        let waves = counts(&[(10, 4, 2), (90, 0, 0)]);
        let recent = Recent {
            reported: 6,
            failed: 2,
        };
        assert_eq!(
            decide(&plan, &waves, recent, &running(1)).state,
            RolloutState::Halted
        );
        // After a resume only reports since count: 0 of 1 new ones failed.
        let recent = Recent {
            reported: 1,
            failed: 0,
        };
        assert_eq!(decide(&plan, &waves, recent, &running(1)), running(1));
    }

    #[test]
    fn an_empty_wave_does_not_block_the_next_and_aborted_is_final() {
        let plan = plan("1,50%,100%", 100, 0, 1);
        // A fleet of 0 at publish: every wave opens at once; nothing pending means completed.
        let waves = counts(&[(0, 0, 0), (0, 0, 0), (0, 0, 0)]);
        let done = decide(&plan, &waves, Recent::default(), &running(1));
        assert_eq!((done.state, done.open), (RolloutState::Completed, 3));
        let aborted = Progress {
            state: RolloutState::Aborted,
            open: 1,
            reason: Some("aborted by the operator".into()),
        };
        assert_eq!(decide(&plan, &waves, Recent::default(), &aborted), aborted);
    }

    #[test]
    fn waves_are_stable_per_rollout_sized_by_the_plan_and_differ_between_rollouts() {
        let plan = plan("1,25%,100%", 90, 10, 1);
        let devices: Vec<String> = (0..12).map(|i| format!("{i:016x}")).collect();
        let waves = assign(&plan, "rollout-a", &devices);
        let sizes = |waves: &[usize]| {
            (0..3)
                .map(|w| waves.iter().filter(|&&x| x == w).count())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&waves), [1, 2, 9]);
        // The same rollout gives each device the same wave whatever the order it is given in.
        let mut reversed = devices.clone();
        reversed.reverse();
        let again = assign(&plan, "rollout-a", &reversed);
        for (i, device) in devices.iter().enumerate() {
            let j = reversed.iter().position(|d| d == device).unwrap();
            assert_eq!(waves[i], again[j], "{device}");
        }
        // Another rollout draws another canary (for at least one of a few keys).
        let canary = |key: &str| {
            let w = assign(&plan, key, &devices);
            devices[w.iter().position(|&x| x == 0).unwrap()].clone()
        };
        let first = canary("rollout-a");
        assert!(
            ["rollout-b", "rollout-c", "rollout-d"]
                .iter()
                .any(|k| canary(k) != first),
            "every rollout picked {first} as its canary"
        );
    }
}
