//! The signed rollout plan (`*.plan`, `ota/FORMAT.md` "Rollout plans"): how one bundle goes out to
//! a fleet in waves, and the health gates between them. Signed by the release keys like a
//! bundle, so that a depot schedules but cannot change what a plan says: which bundle (by its
//! manifest digest), to which product, in which waves, with which thresholds.
//!
//! This module only parses, validates and signs the document, and computes the fleet-size-
//! dependent wave boundaries; it performs no I/O. Architecture invariant: no field of a plan is
//! read before its signatures verified (`Plan::verify`).

use serde::{Deserialize, Serialize};

use crate::{BundleError, SignedDoc, TrustedKeys};

/// The document kind (`quote-edge-signed v1 rollout`).
pub const PLAN_KIND: &str = "rollout";
/// Most waves in a plan.
pub const MAX_WAVES: usize = 16;

/// One wave: how many devices have been offered the bundle once it opens, counted from the
/// first wave (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Wave {
    /// A fixed number of devices (a canary: `1`).
    Devices(u32),
    /// A percentage of the fleet, 1 to 100, rounded up.
    Percent(u8),
}

impl Wave {
    /// `"1"` or `"10%"`, as `ota rollout --waves` takes them.
    pub fn parse(word: &str) -> Result<Wave, PlanError> {
        let bad = |reason: &str| PlanError::Invalid {
            field: "waves",
            reason: format!("{word:?} {reason}"),
        };
        match word.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Wave::Percent(p)),
                _ => Err(bad("is not a percentage from 1% to 100%")),
            },
            None => match word.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Wave::Devices(n)),
                _ => Err(bad(
                    "is neither a device count (1 or more) nor a percentage",
                )),
            },
        }
    }

    /// How many devices of a fleet of `fleet` this wave covers (cumulative).
    fn cover(self, fleet: u32) -> u32 {
        match self {
            Wave::Devices(n) => n.min(fleet),
            Wave::Percent(p) => (u64::from(fleet) * u64::from(p)).div_ceil(100) as u32,
        }
    }
}

impl std::fmt::Display for Wave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wave::Devices(n) => write!(f, "{n}"),
            Wave::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What a rollout plan says. Built with [`Plan::new`] (which validates), or read with
/// [`Plan::verify`]; there is no other way to get one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub format: u32,
    pub product: String,
    /// The bundle's manifest digest (BLAKE3, 64 hex digits): the bundle, whatever its file name.
    pub bundle: String,
    /// The bundle's version, for people reading the plan and for status pages.
    pub version: String,
    /// Cumulative coverage, the last one `100%`.
    pub waves: Vec<Wave>,
    /// A wave opens once this percentage of the devices of the waves before it committed.
    pub success_threshold: u8,
    /// The rollout halts once failures (rollbacks) pass this percentage of the devices that
    /// reported in the open waves, counted once `min_reports` reported.
    pub error_threshold: u8,
    pub min_reports: u32,
}

/// A plan that is not valid, or not verified.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Not a signed document of kind `rollout`, or not signed by a threshold of the keys.
    #[error(transparent)]
    Document(#[from] BundleError),
    #[error("the rollout plan is not valid JSON: {0}")]
    Json(String),
    #[error("rollout plan field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl Plan {
    /// A plan for the bundle whose manifest digest is `bundle`, checked as a device or a depot
    /// would check it.
    pub fn new(
        product: &str,
        bundle: &str,
        version: &str,
        waves: Vec<Wave>,
        success_threshold: u8,
        error_threshold: u8,
        min_reports: u32,
    ) -> Result<Plan, PlanError> {
        let plan = Plan {
            format: 1,
            product: product.to_owned(),
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            waves,
            success_threshold,
            error_threshold,
            min_reports,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// The unsigned document; sign it with [`SignedDoc::sign`].
    pub fn document(&self) -> SignedDoc {
        SignedDoc::new(PLAN_KIND, self)
    }

    /// Reads a plan file: the signatures first (a threshold of `trusted`), then the JSON, then
    /// every rule, then the product.
    pub fn verify(bytes: &[u8], trusted: &TrustedKeys, product: &str) -> Result<Plan, PlanError> {
        let plan = Plan::verify_any_product(bytes, trusted)?;
        if plan.product != product {
            return Err(PlanError::Invalid {
                field: "product",
                reason: format!("the plan is for {:?}, not {product:?}", plan.product),
            });
        }
        Ok(plan)
    }

    /// As [`Plan::verify`], for a depot that serves several products: the signatures, the JSON
    /// and every rule, but the caller checks the product (against its bundle's manifest).
    pub fn verify_any_product(bytes: &[u8], trusted: &TrustedKeys) -> Result<Plan, PlanError> {
        let doc = SignedDoc::parse(bytes, PLAN_KIND)?;
        doc.verify(trusted)?;
        let plan: Plan =
            serde_json::from_str(&doc.json).map_err(|e| PlanError::Json(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<(), PlanError> {
        let invalid = |field, reason: String| Err(PlanError::Invalid { field, reason });
        if self.format != 1 {
            return invalid(
                "format",
                format!("{} (this build reads format 1)", self.format),
            );
        }
        if self.product.is_empty() || self.product.len() > 64 {
            return invalid("product", "must be 1 to 64 characters".into());
        }
        if self.bundle.len() != 64
            || !self
                .bundle
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return invalid(
                "bundle",
                "must be a manifest digest: 64 lowercase hex digits".into(),
            );
        }
        if self.version.is_empty() || self.version.len() > 64 {
            return invalid("version", "must be 1 to 64 characters".into());
        }
        if self.waves.is_empty() || self.waves.len() > MAX_WAVES {
            return invalid("waves", format!("must hold 1 to {MAX_WAVES} waves"));
        }
        if self.waves.last() != Some(&Wave::Percent(100)) {
            return invalid(
                "waves",
                "the last wave must be 100%: a rollout reaches every device".into(),
            );
        }
        // Counts first, then percentages, each strictly growing: coverage never shrinks, for
        // any fleet size.
        for pair in self.waves.windows(2) {
            let grows = match (pair[0], pair[1]) {
                (Wave::Devices(a), Wave::Devices(b)) => a < b,
                (Wave::Percent(a), Wave::Percent(b)) => a < b,
                (Wave::Devices(_), Wave::Percent(_)) => true,
                (Wave::Percent(_), Wave::Devices(_)) => false,
            };
            if !grows {
                return invalid(
                    "waves",
                    format!(
                        "{} after {}: device counts come first, then percentages, each larger than the one before",
                        pair[1], pair[0]
                    ),
                );
            }
        }
        if !(1..=100).contains(&self.success_threshold) {
            return invalid(
                "success_threshold",
                format!("{}: must be 1 to 100 (percent)", self.success_threshold),
            );
        }
        if self.error_threshold > 99 {
            return invalid(
                "error_threshold",
                format!(
                    "{}: must be 0 to 99 (percent; 100 could never halt)",
                    self.error_threshold
                ),
            );
        }
        if self.min_reports == 0 {
            return invalid("min_reports", "must be at least 1".into());
        }
        Ok(())
    }

    /// How many devices each wave covers (cumulative, never shrinking, the last one `fleet`) in
    /// a fleet of `fleet` devices: a depot offers the bundle to the first `cover[i]` devices of
    /// its wave order once wave `i` is open.
    pub fn cover(&self, fleet: u32) -> Vec<u32> {
        let mut last = 0;
        self.waves
            .iter()
            .map(|w| {
                last = w.cover(fleet).max(last);
                last
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    const DIGEST: &str = "5d1c6f8e0a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d";

    fn waves(words: &str) -> Result<Vec<Wave>, PlanError> {
        words.split(',').map(Wave::parse).collect()
    }

    fn plan(words: &str) -> Result<Plan, PlanError> {
        Plan::new("quote-edge", DIGEST, "2.0.0", waves(words)?, 90, 10, 1)
    }

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    #[test]
    fn waves_cover_a_growing_share_of_any_fleet_and_end_with_all_of_it() {
        let plan = plan("1,10%,50%,100%").unwrap();
        assert_eq!(plan.cover(40), [1, 4, 20, 40]);
        // A small fleet: the canary is 1, 10% of 5 rounds up to 1 (an empty wave opens at once).
        assert_eq!(plan.cover(5), [1, 1, 3, 5]);
        assert_eq!(plan.cover(1), [1, 1, 1, 1]);
        assert_eq!(plan.cover(0), [0, 0, 0, 0]);
        assert_eq!(plan.cover(u32::MAX).last(), Some(&u32::MAX));
        // More canaries than devices: capped, never more than the fleet.
        assert_eq!(plan_of("3,100%").cover(2), [2, 2]);
    }

    fn plan_of(words: &str) -> Plan {
        plan(words).unwrap()
    }

    #[test]
    fn bad_plans_are_refused_naming_the_field() {
        let refused = |r: Result<Plan, PlanError>| r.unwrap_err().to_string();
        assert_eq!(
            refused(plan("1,10%,50%")),
            "rollout plan field `waves`: the last wave must be 100%: a rollout reaches every device"
        );
        assert_eq!(
            refused(plan("10%,1,100%")),
            "rollout plan field `waves`: 1 after 10%: device counts come first, then percentages, each larger than the one before"
        );
        assert!(refused(plan("50%,50%,100%")).contains("50% after 50%"));
        assert!(refused(plan("0,100%")).contains("\"0\" is neither a device count"));
        assert!(refused(plan("101%")).contains("\"101%\" is not a percentage"));
        assert!(refused(plan("x")).contains("`waves`"));
        let many = vec!["100%"; MAX_WAVES + 1].join(",");
        assert!(refused(plan(&many)).contains("1 to 16 waves"));
        let with = |success, error, min| {
            Plan::new(
                "quote-edge",
                DIGEST,
                "2",
                vec![Wave::Percent(100)],
                success,
                error,
                min,
            )
        };
        assert!(refused(with(0, 10, 1)).contains("`success_threshold`"));
        assert!(refused(with(101, 10, 1)).contains("`success_threshold`"));
        assert!(refused(with(90, 100, 1)).contains("`error_threshold`: 100"));
        assert!(refused(with(90, 10, 0)).contains("`min_reports`"));
        let digest = |d: &str| Plan::new("quote-edge", d, "2", vec![Wave::Percent(100)], 90, 10, 1);
        assert!(refused(digest("abc")).contains("`bundle`"));
        assert!(refused(digest(&DIGEST.to_uppercase())).contains("`bundle`"));
    }

    #[test]
    fn a_plan_is_read_only_when_signed_by_a_threshold_of_the_release_keys() {
        let (a, b, stranger) = (key(1), key(2), key(3));
        let trusted = TrustedKeys::new([a.public(), b.public()], 2);
        let plan = plan_of("1,25%,100%");
        let mut doc = plan.document();
        doc.sign(&a);
        let text = |doc: &SignedDoc| doc.to_text().into_bytes();
        // One of two: refused before the JSON is read.
        assert!(matches!(
            Plan::verify(&text(&doc), &trusted, "quote-edge"),
            Err(PlanError::Document(BundleError::NotEnoughSignatures {
                valid: 1,
                needed: 2,
                ..
            }))
        ));
        doc.sign(&stranger);
        assert!(Plan::verify(&text(&doc), &trusted, "quote-edge").is_err());
        doc.sign(&b);
        assert_eq!(
            Plan::verify(&text(&doc), &trusted, "quote-edge").unwrap(),
            plan
        );
        // Another product's device refuses it.
        assert!(
            Plan::verify(&text(&doc), &trusted, "other")
                .unwrap_err()
                .to_string()
                .contains("`product`")
        );
        // A depot that edits the plan (a bigger first wave) breaks every signature.
        let edited = String::from_utf8(text(&doc))
            .unwrap()
            .replace("{\"devices\":1}", "{\"devices\":9}");
        assert!(matches!(
            Plan::verify(edited.as_bytes(), &trusted, "quote-edge"),
            Err(PlanError::Document(BundleError::NotEnoughSignatures {
                valid: 0,
                ..
            }))
        ));
        // A key set or a permit is not a plan, whoever signed it.
        let permit = String::from_utf8(text(&doc))
            .unwrap()
            .replacen("v1 rollout", "v1 permit", 1);
        assert!(Plan::verify(permit.as_bytes(), &trusted, "quote-edge").is_err());
    }

    #[test]
    fn a_signed_plan_that_breaks_a_rule_is_still_refused() {
        // Signed by the right key, but invalid: signatures do not make a plan valid.
        let a = key(1);
        let trusted = TrustedKeys::new([a.public()], 1);
        let mut bad = plan_of("1,100%");
        bad.waves = vec![Wave::Percent(50)];
        let mut doc = SignedDoc::new(PLAN_KIND, &bad);
        doc.sign(&a);
        assert!(
            Plan::verify(doc.to_text().as_bytes(), &trusted, "quote-edge")
                .unwrap_err()
                .to_string()
                .contains("the last wave must be 100%")
        );
        let mut doc = SignedDoc::new(PLAN_KIND, &serde_json::json!({"format": 1, "extra": true}));
        doc.sign(&a);
        assert!(matches!(
            Plan::verify(doc.to_text().as_bytes(), &trusted, "quote-edge"),
            Err(PlanError::Json(_))
        ));
    }
}
