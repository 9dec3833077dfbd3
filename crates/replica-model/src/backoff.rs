//! Restart delays: the first restart is immediate, later ones back off exponentially with
//! jitter up to a cap; a replica that stayed healthy long enough starts over; more restarts
//! than the budget within the window mark the slot crash-looping, and it then waits the
//! longest delay every time (it slows down, it never gives up).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::policy::RestartPolicy;

#[derive(Debug)]
pub struct Backoff {
    policy: RestartPolicy,
    /// Restarts since the last reset.
    attempt: u32,
    /// Times of recent restarts, for the budget.
    recent: VecDeque<Instant>,
}

impl Backoff {
    pub fn new(policy: RestartPolicy) -> Self {
        Backoff {
            policy,
            attempt: 0,
            recent: VecDeque::new(),
        }
    }

    /// The delay before the next start. `healthy_for` is how long the process that just ended
    /// was ready; `random` is a number in [0, 1) (injected, so tests are deterministic).
    pub fn next_delay(&mut self, now: Instant, healthy_for: Duration, random: f64) -> Duration {
        if healthy_for >= self.policy.reset_after {
            self.attempt = 0;
        }
        self.recent.push_back(now);
        self.forget_old(now);
        let base = if self.crash_looping() {
            self.policy.max_backoff
        } else if self.attempt == 0 {
            Duration::ZERO
        } else {
            let doublings = (self.attempt - 1).min(30);
            self.policy
                .backoff
                .saturating_mul(1 << doublings)
                .min(self.policy.max_backoff)
        };
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(1.0 + self.policy.jitter * random.clamp(0.0, 1.0))
    }

    /// More restarts than the budget within the window.
    pub fn crash_looping(&self) -> bool {
        self.recent.len() > self.policy.budget as usize
    }

    /// Lets the crash-loop mark expire once the window has passed without restarts.
    pub fn refresh(&mut self, now: Instant) {
        self.forget_old(now);
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(first) = self.recent.front() {
            if now.saturating_duration_since(*first) > self.policy.budget_window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            jitter: 0.2,
            reset_after: Duration::from_secs(60),
            budget: 5,
            budget_window: Duration::from_secs(60),
        }
    }

    #[test]
    fn first_restart_is_immediate_then_doubles_to_the_cap() {
        let mut b = Backoff::new(RestartPolicy {
            budget: 100,
            ..policy()
        });
        let t0 = Instant::now();
        let delays: Vec<_> = (0..10)
            .map(|i| b.next_delay(t0 + Duration::from_secs(i), Duration::ZERO, 0.0))
            .collect();
        let ms: Vec<_> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [0, 250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
    }

    #[test]
    fn jitter_only_lengthens_and_stays_within_its_fraction() {
        let mut b = Backoff::new(policy());
        let t0 = Instant::now();
        b.next_delay(t0, Duration::ZERO, 0.9);
        let d = b.next_delay(t0, Duration::ZERO, 0.999);
        assert!(
            d >= Duration::from_millis(250) && d <= Duration::from_millis(300),
            "{d:?}"
        );
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff() {
        let mut b = Backoff::new(policy());
        let t0 = Instant::now();
        for _ in 0..4 {
            b.next_delay(t0, Duration::ZERO, 0.0);
        }
        let d = b.next_delay(t0 + Duration::from_secs(120), Duration::from_secs(61), 0.0);
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn past_the_budget_it_slows_to_the_cap_and_recovers_after_the_window() {
        let mut b = Backoff::new(policy());
        let t0 = Instant::now();
        for i in 0..5 {
            b.next_delay(t0 + Duration::from_millis(i), Duration::ZERO, 0.0);
            assert!(!b.crash_looping());
        }
        let d = b.next_delay(t0 + Duration::from_millis(6), Duration::ZERO, 0.0);
        assert!(b.crash_looping());
        assert_eq!(d, Duration::from_secs(30));
        b.refresh(t0 + Duration::from_secs(61));
        assert!(!b.crash_looping());
    }
}
