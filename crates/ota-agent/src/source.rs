//! Where bundles come from: one [`Source`] trait, so that the agent scans a USB stick's inbox
//! and polls a fleet depot the same way. A source offers a local file or a depot's download;
//! every offer is verified by the install as if it came from a stranger (the agent trusts keys,
//! not sources).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::inbox::{expand_inboxes, scan_inboxes};
use crate::trust::accept_keysets;

/// One bundle on offer, and where it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// A local file: an inbox, a USB stick, `ota apply`.
    File(PathBuf),
    /// A fleet depot's offer: streamed from the depot and installed while it downloads (no copy
    /// of the bundle on flash), resumed with `Range` after a cut.
    Depot(Box<DepotOffer>),
}

/// What a depot offered (`depot_proto::wire::Offer`), after the device checked its signed plan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DepotOffer {
    /// The depot's base URL.
    pub depot: String,
    pub rollout: u64,
    pub version: String,
    /// The bundle's manifest digest, from the signed plan.
    pub digest: String,
    /// `/bundles/<digest>.bundle` on the depot.
    pub bundle_path: String,
    pub size: u64,
}

impl Offer {
    /// The local file, if it is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Offer::File(path) => Some(path),
            Offer::Depot(_) => None,
        }
    }

    /// The bundle's file name, for receipts and people.
    pub fn file_name(&self) -> Option<String> {
        match self {
            Offer::File(path) => path.file_name().map(|n| n.to_string_lossy().into_owned()),
            Offer::Depot(offer) => offer.bundle_path.rsplit('/').next().map(str::to_owned),
        }
    }

    /// How errors name it: the path, or the depot's URL of the bundle.
    pub fn as_path(&self) -> PathBuf {
        match self {
            Offer::File(path) => path.clone(),
            Offer::Depot(offer) => PathBuf::from(format!("{}{}", offer.depot, offer.bundle_path)),
        }
    }
}

impl From<PathBuf> for Offer {
    fn from(path: PathBuf) -> Offer {
        Offer::File(path)
    }
}

impl std::fmt::Display for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Offer::File(path) => write!(f, "{}", path.display()),
            Offer::Depot(offer) => write!(
                f,
                "{} {} (rollout {} from {})",
                offer.version, offer.bundle_path, offer.rollout, offer.depot
            ),
        }
    }
}

/// What the agent wants offered, as of the scan.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// This device's product.
    pub product: String,
    /// The committed security version: bundles below it are not offered (unless a permit is
    /// beside them).
    pub floor: u64,
    /// Bundle digests not to offer: failed ones, and the release running now.
    pub skip: Vec<String>,
    /// Files already taken (by path, size and mtime): an unchanged file is not offered again.
    pub judged: HashMap<PathBuf, (u64, SystemTime)>,
    /// The version of the release running now (what a depot is told).
    pub running: String,
}

/// A place bundles are offered from. `offers` runs on a blocking task and may take its time
/// (read a stick, download from a depot into a local file).
pub trait Source: Send + Sync + std::fmt::Debug {
    /// Bundles worth trying, best first.
    fn offers(&self, wanted: &Wanted) -> Vec<Offer>;
}

/// The inboxes: `<data_dir>/ota/inbox` and the configured directories (where USB sticks are
/// mounted). Key sets found there are accepted first (each signed by the keys trusted before
/// it), so that a stick can carry a key rotation and the bundle signed by the new keys.
#[derive(Debug, Clone)]
pub struct Inbox {
    pub dirs: Vec<PathBuf>,
    /// The factory's trusted keys.
    pub keys_dir: PathBuf,
    /// `<data_dir>/ota`, where accepted key sets are kept.
    pub ota_dir: PathBuf,
}

impl Source for Inbox {
    fn offers(&self, wanted: &Wanted) -> Vec<Offer> {
        let dirs = expand_inboxes(&self.dirs);
        accept_keysets(&dirs, &self.keys_dir, &self.ota_dir, &wanted.product);
        // The keys trusted now rank the offers; without keys, nothing can be verified (every
        // offer is then refused by the install, and says why).
        let trusted = crate::trust::load_trust(&self.keys_dir, &self.ota_dir, &wanted.product)
            .map(|(trusted, _)| trusted)
            .ok();
        scan_inboxes(
            &dirs,
            &wanted.judged,
            &wanted.skip,
            &wanted.product,
            wanted.floor,
            trusted.as_ref(),
        )
        .into_iter()
        .map(Offer::File)
        .collect()
    }
}

/// Every source's offers, in the order of the sources.
pub(crate) fn offers(sources: &[std::sync::Arc<dyn Source>], wanted: &Wanted) -> Vec<Offer> {
    sources.iter().flat_map(|s| s.offers(wanted)).collect()
}
