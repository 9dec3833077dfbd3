//! The admission policy, pure: may a verified manifest be installed on this device now? The
//! install glue gathers what the device knows ([`Device`]: its product, slot state, downgrade
//! permit, running release, free space) and acts on the [`Decision`]; nothing here reads a file.
//!
//! Architecture invariant: every refusal is decided before the slot is touched, and names what
//! was wrong (the product, the floor, the release running, the free space).

use std::path::PathBuf;

use ota_bundle::Manifest;
use ota_slots::{Release, SlotName, State};

use crate::agent::UpdateError;

/// What the device knows when a bundle's signatures have verified.
#[derive(Debug, Clone)]
pub struct Device<'a> {
    /// This device's product.
    pub product: &'a str,
    /// How far one update may raise the anti-rollback floor (`ota.max_security_step`).
    pub max_security_step: u64,
    pub state: &'a State,
    /// This device's id, for the downgrade refusal (a permit names it).
    pub id: String,
    /// A downgrade permit for this device and this bundle verified against the trusted keys.
    pub permitted: bool,
    /// The release digest of the running release's kept manifest, for a delta; `Err` says why
    /// there is none (the factory release, a manifest not kept or unreadable).
    pub running_digest: Result<String, &'static str>,
    /// Bytes free for the slots, counting the inactive slot's old content (freed before
    /// writing), and where.
    pub free: u64,
    pub slots_dir: PathBuf,
}

/// What the admission checks let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The inactive slot the release goes to.
    pub target: SlotName,
    /// Bytes of the release.
    pub needed: u64,
}

/// The verdict on one bundle.
#[derive(Debug)]
pub enum Decision {
    Admit(Admitted),
    Refuse(UpdateError),
}

/// Whether the bundle is older than what the device committed (below the anti-rollback
/// floor, or older at the same security version): only a downgrade permit lets it in.
pub fn needs_permit(manifest: &Manifest, state: &State) -> bool {
    manifest.security_version < state.highest_security_version
        || (manifest.security_version == state.highest_security_version
            && manifest.issued_at < state.highest_issued_at)
}

/// This product, not further above the anti-rollback floor than one step allows, not below it
/// nor older at the same security version (unless permitted), not the release running now, a
/// delta's base running, and room for the release with a margin.
pub fn admit(manifest: &Manifest, digest: &str, device: &Device<'_>) -> Decision {
    match check(manifest, digest, device) {
        Ok(admitted) => Decision::Admit(admitted),
        Err(refused) => Decision::Refuse(refused),
    }
}

fn check(manifest: &Manifest, digest: &str, device: &Device<'_>) -> Result<Admitted, UpdateError> {
    let state = device.state;
    if manifest.product != device.product {
        return Err(UpdateError::Incompatible {
            found: manifest.product.clone(),
            expected: device.product.to_owned(),
        });
    }
    if manifest.security_version
        > state
            .highest_security_version
            .saturating_add(device.max_security_step)
    {
        return Err(UpdateError::SecurityJump {
            found: manifest.security_version,
            floor: state.highest_security_version,
            max: device.max_security_step,
        });
    }
    if needs_permit(manifest, state) && !device.permitted {
        if manifest.security_version < state.highest_security_version {
            return Err(UpdateError::Downgrade {
                found: manifest.security_version,
                floor: state.highest_security_version,
                device: device.id.clone(),
            });
        }
        return Err(UpdateError::Replay {
            found: manifest.issued_at,
            floor: state.highest_issued_at,
        });
    }
    if let Release::Slot(active) = state.active
        && state.slot(active).bundle_digest.as_deref() == Some(digest)
    {
        return Err(UpdateError::AlreadyRunning(manifest.version.clone()));
    }
    if let Some(base) = &manifest.base {
        let running = match state.active {
            Release::Factory => None,
            Release::Slot(slot) => Some(state.slot(slot).version.clone().unwrap_or_default()),
        };
        let refused = |running: String| UpdateError::Delta {
            base: base.version.clone(),
            running,
        };
        match (running, &device.running_digest) {
            (None, _) => return Err(refused("the factory release".into())),
            (Some(running), Err(why)) => return Err(refused(format!("{running} ({why})"))),
            (Some(running), Ok(found)) if *found != base.digest => return Err(refused(running)),
            (Some(_), Ok(_)) => {}
        }
    }
    let needed: u64 = manifest.files.iter().map(|f| f.size).sum();
    // Headroom for directories, the state file and the file system's own blocks.
    let needed_with_margin = needed + needed / 32 + (1 << 20);
    if device.free < needed_with_margin {
        return Err(UpdateError::NoSpace {
            path: device.slots_dir.clone(),
            needed: needed_with_margin,
            free: device.free,
        });
    }
    Ok(Admitted {
        target: state.inactive(),
        needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "d2";

    fn manifest(security_version: u64, issued_at: u64) -> Manifest {
        Manifest {
            format: 2,
            product: "quote-edge".into(),
            version: "2.0.0".into(),
            security_version,
            issued_at,
            hash: "sha256".into(),
            chunk_size: ota_bundle::CHUNK_SIZE,
            base: None,
            files: vec![ota_bundle::FileEntry {
                path: "bin/quote-service".into(),
                mode: 0o755,
                size: 10 << 20,
                digest: "00".repeat(32),
                chunks: vec![],
            }],
        }
    }

    /// A device that committed release 1.0.0 (security version 3, issued at 100) in slot A.
    fn committed() -> State {
        let (state, slot) = State::default().begin_install("d1", "1.0.0", 3).unwrap();
        let state = state.finish_install(slot).unwrap().switch(slot).unwrap();
        state.commit(100).unwrap()
    }

    fn device(state: &State) -> Device<'_> {
        Device {
            product: "quote-edge",
            max_security_step: 100,
            state,
            id: "dev-1".into(),
            permitted: false,
            running_digest: Ok("r1".into()),
            free: 1 << 30,
            slots_dir: PathBuf::from("/data/ota/slots"),
        }
    }

    fn refusal(decision: Decision) -> UpdateError {
        match decision {
            Decision::Refuse(error) => error,
            Decision::Admit(admitted) => panic!("admitted: {admitted:?}"),
        }
    }

    #[test]
    fn a_newer_release_for_this_product_goes_to_the_inactive_slot() {
        let state = committed();
        let Decision::Admit(admitted) = admit(&manifest(3, 200), DIGEST, &device(&state)) else {
            panic!("refused");
        };
        assert_eq!(admitted.target, SlotName::B);
        assert_eq!(admitted.needed, 10 << 20);
    }

    #[test]
    fn another_product_is_refused_by_name() {
        let state = committed();
        let mut other = manifest(3, 200);
        other.product = "toaster".into();
        let error = refusal(admit(&other, DIGEST, &device(&state)));
        assert_eq!(
            error.to_string(),
            "the bundle is for product \"toaster\", this device is \"quote-edge\""
        );
    }

    #[test]
    fn downgrade_refused_unless_a_permit_for_this_device_verified() {
        let state = committed();
        let old = manifest(2, 200);
        let error = refusal(admit(&old, DIGEST, &device(&state)));
        assert!(
            matches!(error, UpdateError::Downgrade { found: 2, floor: 3, ref device } if device == "dev-1"),
            "{error}"
        );
        let permitted = Device {
            permitted: true,
            ..device(&state)
        };
        assert!(matches!(
            admit(&old, DIGEST, &permitted),
            Decision::Admit(_)
        ));
    }

    #[test]
    fn a_jump_past_one_step_above_the_floor_is_refused_saying_the_bound() {
        let state = committed();
        assert!(matches!(
            admit(&manifest(103, 200), DIGEST, &device(&state)),
            Decision::Admit(_)
        ));
        let error = refusal(admit(&manifest(104, 200), DIGEST, &device(&state)));
        assert!(
            matches!(
                error,
                UpdateError::SecurityJump {
                    found: 104,
                    floor: 3,
                    max: 100
                }
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("ota.max_security_step"),
            "{error}"
        );
        // The top of the range, as a leaked key would sign it, cannot overflow the check.
        let error = refusal(admit(&manifest(u64::MAX, 200), DIGEST, &device(&state)));
        assert!(matches!(error, UpdateError::SecurityJump { .. }), "{error}");
    }

    #[test]
    fn an_older_bundle_of_the_same_security_version_is_a_replay() {
        let state = committed();
        assert!(needs_permit(&manifest(3, 99), &state));
        assert!(!needs_permit(&manifest(3, 100), &state));
        let error = refusal(admit(&manifest(3, 99), DIGEST, &device(&state)));
        assert!(
            matches!(
                error,
                UpdateError::Replay {
                    found: 99,
                    floor: 100
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn the_release_running_now_is_not_installed_again() {
        let state = committed();
        let error = refusal(admit(&manifest(3, 200), "d1", &device(&state)));
        assert!(matches!(error, UpdateError::AlreadyRunning(ref v) if v == "2.0.0"));
    }

    #[test]
    fn a_delta_needs_its_base_running() {
        let state = committed();
        let mut delta = manifest(3, 200);
        delta.base = Some(ota_bundle::Base {
            version: "1.0.0".into(),
            digest: "r1".into(),
        });
        assert!(matches!(
            admit(&delta, DIGEST, &device(&state)),
            Decision::Admit(_)
        ));
        let other_base = Device {
            running_digest: Ok("r0".into()),
            ..device(&state)
        };
        let error = refusal(admit(&delta, DIGEST, &other_base));
        assert!(
            matches!(error, UpdateError::Delta { ref running, .. } if running == "1.0.0"),
            "{error}"
        );
        let not_kept = Device {
            running_digest: Err("whose manifest is not kept"),
            ..device(&state)
        };
        let error = refusal(admit(&delta, DIGEST, &not_kept));
        assert!(
            error
                .to_string()
                .contains("1.0.0 (whose manifest is not kept)"),
            "{error}"
        );
        let factory = State::default();
        let error = refusal(admit(&delta, DIGEST, &device(&factory)));
        assert!(error.to_string().contains("the factory release"), "{error}");
    }

    #[test]
    fn no_space_is_refused_naming_the_bytes_and_the_place() {
        let state = committed();
        let full = Device {
            free: 10 << 20,
            ..device(&state)
        };
        let error = refusal(admit(&manifest(3, 200), DIGEST, &full));
        let UpdateError::NoSpace { path, needed, free } = &error else {
            panic!("{error}");
        };
        assert_eq!(path, &PathBuf::from("/data/ota/slots"));
        assert_eq!(
            (*needed, *free),
            ((10 << 20) + (10 << 20) / 32 + (1 << 20), 10 << 20)
        );
    }
}
