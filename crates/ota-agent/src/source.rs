//! Where bundles come from: one [`Source`] trait, so that the agent scans a USB stick's inbox
//! today and a depot tomorrow the same way. A source only offers local files; every offer is
//! verified by the install as if it came from a stranger (the agent trusts keys, not sources).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::inbox::{expand_inboxes, scan_inboxes};
use crate::trust::accept_keysets;

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
}

/// A place bundles are offered from. `offers` runs on a blocking task and may take its time
/// (read a stick, download from a depot into a local file).
pub trait Source: Send + Sync + std::fmt::Debug {
    /// Local bundle files worth trying, best first.
    fn offers(&self, wanted: &Wanted) -> Vec<PathBuf>;
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
    fn offers(&self, wanted: &Wanted) -> Vec<PathBuf> {
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
    }
}

/// Every source's offers, in the order of the sources.
pub(crate) fn offers(sources: &[std::sync::Arc<dyn Source>], wanted: &Wanted) -> Vec<PathBuf> {
    sources.iter().flat_map(|s| s.offers(wanted)).collect()
}
