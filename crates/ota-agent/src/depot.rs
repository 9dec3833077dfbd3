//! A fleet depot (`ota-depot`) as a source of bundles, and the device's side of its protocol
//! (ota/FORMAT.md, "The depot protocol"):
//!
//! - [`DepotSource`] polls the depot every `poll_interval` (±10%, so a fleet that booted
//!   together does not poll together), signed with the device key. An offer is taken only after
//!   its rollout plan verified with the keys this device trusts now, for this product, naming
//!   the very bundle offered: the depot schedules, it is not trusted for what to install.
//! - [`Download`] reads the offered bundle straight into the install (no copy on flash), in
//!   parts of [`PART`] bytes (one chunk), each one a `Range` request; a part cut off is asked
//!   for again from the byte where it stopped, so nothing is downloaded twice. The first part
//!   is [`HEAD_PART`]: an install resumed after a restart reads the head, then asks for the
//!   rest from its journal mark, and a whole first part would be sent for nothing.
//! - [`post_receipt`] tells the depot the outcome with the signed receipt. Reports are also
//!   made from what the device keeps, so none is lost to a restart: a commit is the version
//!   every poll carries, a rollback or refusal the receipt in `<ota>/receipts/` found again when
//!   the depot offers that bundle once more.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use depot_proto::client::Client;
use depot_proto::wire::{Event, Poll, Report};
use ota_bundle::{Plan, Receipt, SecretKey, TrustedKeys};

use crate::source::{DepotOffer, Offer, Source, Wanted};

/// Bytes asked for in one request: one chunk, what a slow link must carry within
/// [`PART_TIMEOUT`] (35 KB/s at least). A link that dies without a word (no reset: a cable
/// pulled, a network detached) holds a part for that long before it is asked for again.
pub const PART: u64 = ota_bundle::CHUNK_SIZE;
/// The first part of a download from the start: the head of a bundle (its header, manifest
/// and signatures: a few KiB) and some payload. A resumed install needs only the head from
/// the start of the bundle, so this is what a resume asks for that it does not use, at most.
pub const HEAD_PART: u64 = 64 << 10;
/// How long one part may take, connecting included.
pub const PART_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a download may go without a byte before the install gives up (it is offered
/// again at the next poll, and resumes from its journal).
pub const STALL: Duration = Duration::from_secs(15 * 60);
/// Timeout of polls and reports.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The depot source: `[ota] depot` and `poll_interval`.
#[derive(Debug)]
pub struct DepotSource {
    pub url: String,
    pub poll_interval: Duration,
    /// The device key (`<ota>/device.key`): requests and receipts are signed with it.
    pub key_path: PathBuf,
    /// The factory's trusted keys, and `<ota>` (accepted key sets, receipts).
    pub keys_dir: PathBuf,
    pub ota_dir: PathBuf,
    next_poll: Mutex<Option<Instant>>,
}

impl DepotSource {
    pub fn new(url: &str, poll_interval: Duration, keys_dir: &Path, ota_dir: &Path) -> DepotSource {
        DepotSource {
            url: url.trim_end_matches('/').to_owned(),
            poll_interval,
            key_path: ota_dir.join("device.key"),
            keys_dir: keys_dir.to_owned(),
            ota_dir: ota_dir.to_owned(),
            next_poll: Mutex::new(None),
        }
    }

    /// True (and the next poll scheduled) when a poll is due.
    fn due(&self, now: Instant) -> bool {
        let mut next = self.next_poll.lock().expect("next poll");
        if next.is_some_and(|at| now < at) {
            return false;
        }
        *next = Some(now + jittered(self.poll_interval));
        true
    }

    fn poll(&self, wanted: &Wanted) -> Result<Option<DepotOffer>, String> {
        let key = crate::receipt::device_key(&self.key_path).map_err(|e| e.to_string())?;
        let client = Client::new(&self.url, REQUEST_TIMEOUT);
        let reply = client
            .poll(
                &key,
                &Poll {
                    product: wanted.product.clone(),
                    version: wanted.running.clone(),
                },
            )
            .map_err(|e| e.to_string())?;
        let Some(offer) = reply.offer else {
            return Ok(None);
        };
        let (trusted, _) = crate::trust::load_trust(&self.keys_dir, &self.ota_dir, &wanted.product)
            .map_err(|e| e.to_string())?;
        let plan = checked_plan(&offer, &trusted, &wanted.product)?;
        if wanted.skip.contains(&plan.bundle) {
            // Judged already (rolled back, refused, or running): tell the depot again, from
            // the receipt kept for it.
            if let Some((event, text)) = kept_outcome(&self.ota_dir, &key, &plan.bundle) {
                report(&client, &key, offer.rollout, event, Some(text));
            }
            return Ok(None);
        }
        report(&client, &key, offer.rollout, Event::Installing, None);
        Ok(Some(DepotOffer {
            depot: self.url.clone(),
            rollout: offer.rollout,
            version: plan.version,
            digest: plan.bundle,
            bundle_path: offer.bundle_path,
            size: offer.bundle_size,
        }))
    }
}

impl Source for DepotSource {
    fn offers(&self, wanted: &Wanted) -> Vec<Offer> {
        if !self.due(Instant::now()) {
            return Vec::new();
        }
        match self.poll(wanted) {
            Ok(Some(offer)) => {
                tracing::info!(depot = %self.url, rollout = offer.rollout, version = %offer.version, "the depot offers an update");
                vec![Offer::Depot(Box::new(offer))]
            }
            Ok(None) => Vec::new(),
            Err(error) => {
                tracing::warn!(depot = %self.url, %error, "cannot poll the depot");
                Vec::new()
            }
        }
    }
}

/// The offer's plan, verified with the keys trusted now, for this product, and naming the
/// bundle offered (by its manifest digest, the file name the depot serves it under).
fn checked_plan(
    offer: &depot_proto::wire::Offer,
    trusted: &TrustedKeys,
    product: &str,
) -> Result<Plan, String> {
    let plan = Plan::verify(offer.plan.as_bytes(), trusted, product)
        .map_err(|e| format!("the depot's rollout plan is refused: {e}"))?;
    let expected = format!("/bundles/{}.bundle", plan.bundle);
    if offer.bundle_path != expected || offer.version != plan.version {
        return Err(format!(
            "the depot offers {} ({}), its signed plan says {expected} ({})",
            offer.bundle_path, offer.version, plan.version
        ));
    }
    Ok(plan)
}

/// ±10% of `interval`, from the system's random source.
fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    // 0..=255 onto 0.9..=1.1.
    interval.mul_f64(0.9 + f64::from(byte[0]) / 255.0 * 0.2)
}

fn report(client: &Client, key: &SecretKey, rollout: u64, event: Event, receipt: Option<String>) {
    let sent = client.report(
        key,
        &Report {
            rollout,
            event,
            receipt,
        },
    );
    match sent {
        Ok(_) => tracing::info!(rollout, ?event, "reported to the depot"),
        Err(error) => tracing::warn!(rollout, ?event, %error, "cannot report to the depot"),
    }
}

/// Posts a written receipt of an update offered by a depot (best effort: see the module).
pub(crate) fn post_receipt(offer: &DepotOffer, key_path: &Path, text: &str, result: &str) {
    let event = match result {
        "committed" => Event::Committed,
        "rolled_back" => Event::RolledBack,
        "refused" => Event::Refused,
        _ => return,
    };
    match crate::receipt::device_key(key_path) {
        Ok(key) => report(
            &Client::new(&offer.depot, REQUEST_TIMEOUT),
            &key,
            offer.rollout,
            event,
            Some(text.to_owned()),
        ),
        Err(error) => tracing::warn!(%error, "cannot report to the depot"),
    }
}

/// The newest failure receipt this device signed for `digest` (`<ota>/receipts/`).
fn kept_outcome(ota_dir: &Path, key: &SecretKey, digest: &str) -> Option<(Event, String)> {
    let mine = TrustedKeys::new([key.public()], 1);
    let entries = std::fs::read_dir(ota_dir.join("receipts")).ok()?;
    let mut best: Option<(u64, Event, String)> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "receipt") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(receipt) = Receipt::verify(text.as_bytes(), &mine) else {
            continue;
        };
        let event = match receipt.result.as_str() {
            "rolled_back" => Event::RolledBack,
            "refused" => Event::Refused,
            _ => continue,
        };
        if receipt.bundle_digest.as_deref() == Some(digest)
            && best
                .as_ref()
                .is_none_or(|(at, _, _)| receipt.finished_at >= *at)
        {
            best = Some((receipt.finished_at, event, text));
        }
    }
    best.map(|(_, event, text)| (event, text))
}

/// What the downloads of one install cost: requests made and bytes received (more than the
/// bundle's size only by what a cut lost in flight, and the head read again to keep it).
#[derive(Debug, Default)]
pub struct DownloadStats {
    pub requests: AtomicU64,
    pub received: AtomicU64,
}

/// An offered bundle, read from the depot from byte `at` on, part by part; a part cut off is
/// asked for again from where it stopped, until [`STALL`] passes without a byte.
pub struct Download {
    client: Client,
    path: String,
    size: u64,
    device: Option<String>,
    at: u64,
    /// Where to stop (exclusive): the end of the file, or of the part of it asked for.
    end: u64,
    part: Option<(Box<dyn Read + Send>, u64)>,
    stats: Arc<DownloadStats>,
}

impl Download {
    /// The bundle from byte `at` to its end.
    pub fn new(
        offer: &DepotOffer,
        at: u64,
        device: Option<String>,
        stats: Arc<DownloadStats>,
    ) -> Download {
        Download::range(offer, at..offer.size, device, stats)
    }

    /// Bytes `range` of the bundle, and nothing more is asked of the depot.
    pub fn range(
        offer: &DepotOffer,
        range: std::ops::Range<u64>,
        device: Option<String>,
        stats: Arc<DownloadStats>,
    ) -> Download {
        Download {
            client: Client::new(&offer.depot, PART_TIMEOUT),
            path: offer.bundle_path.clone(),
            size: offer.size,
            device,
            at: range.start,
            end: range.end.min(offer.size),
            part: None,
            stats,
        }
    }

    fn open_part(&mut self) -> std::io::Result<()> {
        let part = if self.at == 0 { HEAD_PART } else { PART };
        let end = (self.at + part).min(self.end);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let body = self
            .client
            .download(&self.path, self.at..end, self.size, self.device.as_deref())
            .map_err(std::io::Error::other)?;
        self.part = Some((Box::new(body), end));
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.at >= self.end || buf.is_empty() {
                return Ok(0);
            }
            let attempt = match &mut self.part {
                Some((_, end)) if self.at >= *end => {
                    self.part = None;
                    continue;
                }
                Some((body, _)) => body.read(buf),
                None => self.open_part().map(|()| usize::MAX),
            };
            let error = match attempt {
                Ok(usize::MAX) => continue,
                Ok(0) => std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the part ended early at byte {}", self.at),
                ),
                Ok(n) => {
                    self.at += n as u64;
                    self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) => e,
            };
            self.part = None;
            if started.elapsed() >= STALL {
                return Err(error);
            }
            tracing::warn!(%error, at = self.at, "the download was cut; asking again from where it stopped");
            // Backoff between attempts, not a synchronisation: the depot or the link is away.
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poll_interval_is_jittered_within_ten_percent() {
        let base = Duration::from_secs(100);
        for _ in 0..200 {
            let d = jittered(base);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }

    #[test]
    fn an_offer_is_taken_only_with_a_plan_the_trusted_keys_signed_for_the_bundle_offered() {
        let key = SecretKey::from_seed([3; 32]);
        let trusted = TrustedKeys::new([key.public()], 1);
        let digest = "ab".repeat(32);
        let plan = Plan::new(
            "quote-edge",
            &digest,
            "2.0.0",
            vec![ota_bundle::Wave::Percent(100)],
            90,
            10,
            1,
        )
        .unwrap();
        let mut doc = plan.document();
        doc.sign(&key);
        let offer = depot_proto::wire::Offer {
            rollout: 1,
            version: "2.0.0".into(),
            plan: doc.to_text(),
            bundle_path: format!("/bundles/{digest}.bundle"),
            bundle_size: 10,
        };
        assert_eq!(
            checked_plan(&offer, &trusted, "quote-edge").unwrap().bundle,
            digest
        );
        let refused = |offer: &depot_proto::wire::Offer, product: &str| {
            checked_plan(offer, &trusted, product).unwrap_err()
        };
        // Another bundle behind the plan's back, another version, another product.
        let other = depot_proto::wire::Offer {
            bundle_path: format!("/bundles/{}.bundle", "cd".repeat(32)),
            ..offer.clone()
        };
        assert!(refused(&other, "quote-edge").contains("its signed plan says"));
        let newer = depot_proto::wire::Offer {
            version: "9.0.0".into(),
            ..offer.clone()
        };
        assert!(refused(&newer, "quote-edge").contains("its signed plan says"));
        assert!(refused(&offer, "other-product").contains("is for"));
        // The plan edited by the depot, or signed by a key this device does not trust.
        let edited = depot_proto::wire::Offer {
            plan: offer
                .plan
                .replace("\"success_threshold\":90", "\"success_threshold\":1"),
            ..offer.clone()
        };
        assert!(refused(&edited, "quote-edge").contains("refused"));
        let mut foreign = plan.document();
        foreign.sign(&SecretKey::from_seed([4; 32]));
        let foreign = depot_proto::wire::Offer {
            plan: foreign.to_text(),
            ..offer
        };
        assert!(refused(&foreign, "quote-edge").contains("signed by 0"));
    }

    #[test]
    fn a_poll_is_due_once_per_interval() {
        let source = DepotSource::new(
            "http://depot",
            Duration::from_secs(60),
            Path::new("/k"),
            Path::new("/o"),
        );
        let t0 = Instant::now();
        assert!(source.due(t0));
        assert!(!source.due(t0 + Duration::from_secs(10)));
        assert!(source.due(t0 + Duration::from_secs(67)));
    }
}
