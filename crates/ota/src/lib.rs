//! `ota`: the host-side update tool. `keygen` makes a signing key, `pack` turns a release
//! directory into a signed bundle, `sign` adds a signature (k-of-n), `verify` checks a bundle
//! completely against trusted keys, `inspect` shows what a bundle claims without trusting it;
//! `apply` and `status` ask a device's supervisor (its OTA agent) over the control socket.
//!
//! Architecture invariant: `ota` never touches a device slot; installing is the supervisor's
//! OTA agent's job.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

pub mod device;
use edge_proto::client::ClientError;
use ota_bundle::{
    Bundle, BundleError, ChunksError, PackOptions, PublicKey, SecretKey, TrustedKeys,
};
use serde::Serialize;

/// Exit codes of `ota`: the workspace's one set (`edge_proto::exit`), shared with
/// `edge-supervisor`: 3 refused (a bundle, a document, the device, an update not committed),
/// 4 no supervisor answers, 74 a file could not be read or written, 2 a bad command line.
pub use edge_proto::exit;

#[derive(Debug, Parser)]
#[command(
    name = "ota",
    version,
    about = "quote-edge update bundles: keygen, pack, sign, verify, inspect, apply, status"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make an Ed25519 signing key: PREFIX.key (mode 0600) and PREFIX.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Free text stored in the public key line.
        #[arg(long, default_value = "quote-edge signing key")]
        comment: String,
    },
    /// Pack a release directory (bin/, etc/, migrations/, ...) into a signed bundle.
    Pack {
        /// Signing key (from `ota keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Display version, e.g. 1.4.0.
        #[arg(long)]
        version: String,
        /// Monotonic anti-rollback number; devices refuse lower ones.
        #[arg(long, default_value_t = 0)]
        security_version: u64,
        /// The product the bundle is for; devices refuse another.
        #[arg(long, default_value = "quote-edge")]
        compatible: String,
        /// zstd level: 3 is fast, 19 is the release level.
        #[arg(long, default_value_t = 19)]
        level: i32,
        /// Make a delta against the release in this (earlier) bundle: chunks it already has
        /// are copied on the device from the running release instead of carried.
        #[arg(long)]
        delta_from: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The release directory.
        dir: PathBuf,
    },
    /// Add a signature to a bundle (for k-of-n signing).
    Sign {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Check signatures, manifest and every chunk of a bundle.
    Verify {
        /// A trusted public key.
        #[arg(long, conflicts_with = "keys", required_unless_present = "keys")]
        key: Option<PathBuf>,
        /// A directory of trusted *.pub keys (and an optional `threshold` file).
        #[arg(long)]
        keys: Option<PathBuf>,
        file: PathBuf,
    },
    /// Show what a bundle claims, without checking signatures.
    Inspect {
        #[arg(long)]
        json: bool,
        file: PathBuf,
    },
    /// Make a key-set document: the keys devices trust from serial N on. Devices accept set N
    /// only when a threshold of set N-1 signed it (`--key`, repeatable, or `ota sign-doc`).
    Keyset {
        #[arg(long)]
        serial: u64,
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        #[arg(long, default_value = "quote-edge")]
        compatible: String,
        /// Signing keys: a threshold of the current set's, and a threshold of the new set's
        /// (a device accepts the set only with both).
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The new set's public keys.
        #[arg(required = true)]
        public: Vec<PathBuf>,
    },
    /// Make a downgrade permit: lets one device (its id is in every receipt it writes, and in
    /// the refusal) install one bundle below its anti-rollback floor.
    Permit {
        #[arg(long)]
        device: String,
        #[arg(long, default_value = "quote-edge")]
        compatible: String,
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The bundle it permits.
        bundle: PathBuf,
    },
    /// Make a rollout plan for a fleet (ota/FORMAT.md "Rollout plans"): the bundle (by its
    /// manifest digest) goes out in waves, each opening once the previous ones committed well
    /// enough, and the rollout halts when too many fail. Signed like a bundle; more signatures
    /// with `sign-doc`.
    Rollout {
        #[arg(long = "key")]
        keys: Vec<PathBuf>,
        #[arg(long)]
        bundle: PathBuf,
        /// Cumulative waves: device counts, then percentages, the last 100%.
        #[arg(long, default_value = "1,10%,50%,100%")]
        waves: String,
        /// Percent of the devices of the opened waves that must have committed for the next
        /// wave to open.
        #[arg(long)]
        success_threshold: u8,
        /// Percent of failed reports in the open waves past which the rollout halts.
        #[arg(long)]
        error_threshold: u8,
        /// Reports needed before the error threshold counts.
        #[arg(long, default_value_t = 1)]
        min_reports: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature to a key set, a permit or a rollout plan.
    SignDoc {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Install receipts: what devices say of their updates.
    Receipt {
        #[command(subcommand)]
        action: ReceiptAction,
    },
    /// Install a bundle on the device through its supervisor, and follow the update to its end
    /// (exit 0 committed, 3 refused or rolled back).
    Apply {
        #[command(flatten)]
        device: DeviceArgs,
        /// Progress as JSON lines (each the `update` object of `status --json`).
        #[arg(long)]
        json: bool,
        file: PathBuf,
    },
    /// The device's update state: running version, agent state, progress, last result.
    Status {
        #[command(flatten)]
        device: DeviceArgs,
        #[arg(long)]
        json: bool,
    },
}

/// Where the device's supervisor listens (as `edge-supervisor`'s own subcommands take it).
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// The supervisor's data directory (its socket is `<DIR>/supervisor.sock`).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// The control socket, if not in the data directory.
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl DeviceArgs {
    fn socket(self) -> PathBuf {
        self.socket
            .unwrap_or_else(|| self.data_dir.join("supervisor.sock"))
    }
}

/// `ota receipt …`.
#[derive(Debug, clap::Subcommand)]
pub enum ReceiptAction {
    /// Verify receipts: each must be signed by the device it names, one of the enrolled keys.
    /// Prints one line per receipt; exits 3 if any does not verify.
    Verify {
        /// Enrolled device keys: one `*.pub` per device, as `edge-supervisor device-key`
        /// printed it on that device.
        #[arg(long)]
        device_keys: PathBuf,
        #[arg(required = true)]
        receipts: Vec<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("the device refused: {0}")]
    Device(String),
    /// No reply from the device's supervisor; names the socket.
    #[error(transparent)]
    Control(#[from] edge_proto::client::ClientError),
    #[error("the update did not commit")]
    NotCommitted,
    #[error("{failed} of {total} receipts did not verify")]
    Receipts { failed: usize, total: usize },
}

impl OtaError {
    pub fn exit_code(&self) -> i32 {
        match self {
            OtaError::Bundle(
                BundleError::Write { .. }
                | BundleError::Persist(_)
                | BundleError::Key { .. }
                | BundleError::Release { .. },
            ) => exit::IO,
            OtaError::Bundle(_) => exit::REFUSED,
            OtaError::Io { .. } => exit::IO,
            OtaError::Usage(_) => exit::USAGE,
            OtaError::Device(_) | OtaError::NotCommitted | OtaError::Receipts { .. } => {
                exit::REFUSED
            }
            // A wrong answer is a refusal; no answer, as for `edge-supervisor status`.
            OtaError::Control(ClientError::BadReply { .. } | ClientError::TooLong { .. }) => {
                exit::REFUSED
            }
            OtaError::Control(_) => exit::UNREACHABLE,
        }
    }
}

/// What `inspect --json` prints.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub verified: bool,
    pub product: String,
    pub version: String,
    pub security_version: u64,
    pub issued_at: u64,
    pub files: Vec<InspectedFile>,
    pub signatures: Vec<String>,
    pub payload_bytes: u64,
    pub bundle_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct InspectedFile {
    pub path: String,
    pub mode: String,
    pub size: u64,
    pub chunks: usize,
}

/// Runs one command, writing its report to `out`. One arm per subcommand, as a dispatch
/// table: the arms that do more than a few lines call a function below (pack, verify,
/// status, inspect).
pub fn run(command: Command, out: &mut dyn Write) -> Result<(), OtaError> {
    match command {
        Command::Keygen {
            out: prefix,
            comment,
        } => keygen(&prefix, &comment, out),
        Command::Pack {
            key,
            version,
            security_version,
            compatible,
            level,
            delta_from,
            out: file,
            dir,
        } => {
            if !(1..=22).contains(&level) {
                return Err(OtaError::Usage(format!(
                    "--level must be 1 to 22, got {level}"
                )));
            }
            let options = PackOptions {
                product: compatible,
                version,
                security_version,
                issued_at: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                level,
            };
            pack_command(&key, &dir, &file, delta_from.as_deref(), &options, out)
        }
        Command::Sign { key, file } => {
            let key = SecretKey::load(&key)?;
            let count = ota_bundle::add_signature(&file, &key)?;
            writeln!(
                out,
                "{}: signed by {} ({count} signatures)",
                file.display(),
                key.public().id()
            )
            .map_err(|e| io(&file, e))
        }
        Command::Verify { key, keys, file } => verify(key, keys, &file, out),
        Command::Keyset {
            serial,
            threshold,
            compatible,
            keys,
            out: file,
            public,
        } => {
            let public = public
                .iter()
                .map(|p| PublicKey::load(p))
                .collect::<Result<Vec<_>, _>>()?;
            let mut doc = ota_bundle::KeySet::document(&compatible, serial, threshold, &public)?;
            for key in &keys {
                doc.sign(&SecretKey::load(key)?);
            }
            write_doc(&file, &doc, out)
        }
        Command::Permit {
            device,
            compatible,
            keys,
            out: file,
            bundle,
        } => {
            let reader =
                std::io::BufReader::new(std::fs::File::open(&bundle).map_err(|e| io(&bundle, e))?);
            let (manifest, _, digest) = ota_bundle::read_manifest_and_digest_unverified(reader)?;
            let mut doc = ota_bundle::Permit::document(&ota_bundle::Permit {
                format: 1,
                product: compatible,
                device,
                bundle: digest,
                version: manifest.version,
            });
            for key in &keys {
                doc.sign(&SecretKey::load(key)?);
            }
            write_doc(&file, &doc, out)
        }
        Command::Rollout {
            keys,
            bundle,
            waves,
            success_threshold,
            error_threshold,
            min_reports,
            out: file,
        } => {
            let reader =
                std::io::BufReader::new(std::fs::File::open(&bundle).map_err(|e| io(&bundle, e))?);
            let (manifest, _, digest) = ota_bundle::read_manifest_and_digest_unverified(reader)?;
            // A bad wave list or threshold is a bad command line, named by its field.
            let usage = |e: ota_bundle::PlanError| OtaError::Usage(e.to_string());
            let waves = waves
                .split(',')
                .map(|w| ota_bundle::Wave::parse(w.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            let plan = ota_bundle::Plan::new(
                &manifest.product,
                &digest,
                &manifest.version,
                waves,
                success_threshold,
                error_threshold,
                min_reports,
            )
            .map_err(usage)?;
            if keys.is_empty() {
                return Err(OtaError::Usage(
                    "a rollout plan needs at least one --key: devices and depots refuse it unsigned"
                        .into(),
                ));
            }
            let mut doc = plan.document();
            for key in &keys {
                doc.sign(&SecretKey::load(key)?);
            }
            write_doc(&file, &doc, out)
        }
        Command::Receipt {
            action:
                ReceiptAction::Verify {
                    device_keys,
                    receipts,
                },
        } => verify_receipts(&device_keys, &receipts, out),
        Command::SignDoc { key, file } => {
            let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
            let kind = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.lines().next())
                .and_then(|l| l.strip_prefix("quote-edge-signed v1 "))
                .unwrap_or("keyset")
                .to_owned();
            let mut doc = ota_bundle::SignedDoc::parse(&bytes, &kind)?;
            doc.sign(&SecretKey::load(&key)?);
            write_doc(&file, &doc, out)
        }
        Command::Apply { device, json, file } => {
            let socket = device.socket();
            if device::apply(&socket, &file, json, out)? {
                Ok(())
            } else {
                Err(OtaError::NotCommitted)
            }
        }
        Command::Status { device, json } => status(&device.socket(), json, out),
        Command::Inspect { json, file } => inspect_command(&file, json, out),
    }
}

/// `ota pack`: a release directory into a signed bundle, full or a delta against `delta_from`.
fn pack_command(
    key: &Path,
    dir: &Path,
    file: &Path,
    delta_from: Option<&Path>,
    options: &PackOptions,
    out: &mut dyn Write,
) -> Result<(), OtaError> {
    let key = SecretKey::load(key)?;
    let terminal = std::io::stderr().is_terminal();
    let mut shown = u64::MAX;
    let show = |done: u64, total: u64| {
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        if terminal && percent != shown {
            shown = percent;
            let _ = write!(std::io::stderr(), "\rpacking {percent:3}%");
        }
    };
    let report = match delta_from {
        None => ota_bundle::pack(dir, file, options, &key, show)?,
        Some(old) => {
            let reader = std::io::BufReader::new(std::fs::File::open(old).map_err(|e| io(old, e))?);
            let (base, _) = ota_bundle::read_manifest_unverified(reader)?;
            ota_bundle::pack_delta(dir, file, options, &key, &base, show)?
        }
    };
    if terminal {
        let _ = writeln!(std::io::stderr());
    }
    let ratio = report.bundle_bytes as f64 / report.input_bytes.max(1) as f64 * 100.0;
    writeln!(
        out,
        "{}: {} files, {} bytes -> {} bytes ({ratio:.1}%), signed by {}",
        file.display(),
        report.files,
        report.input_bytes,
        report.bundle_bytes,
        key.public().id()
    )
    .map_err(|e| io(file, e))
}

/// `ota verify`: the signatures, then every chunk against its signed hash.
fn verify(
    key: Option<PathBuf>,
    keys: Option<PathBuf>,
    file: &Path,
    out: &mut dyn Write,
) -> Result<(), OtaError> {
    let trusted = match (key, keys) {
        (Some(key), _) => TrustedKeys::new([PublicKey::load(&key)?], 1),
        (None, Some(dir)) => TrustedKeys::load_dir(&dir)?,
        (None, None) => return Err(OtaError::Usage("--key or --keys is required".into())),
    };
    let reader = std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(file).map_err(|e| io(file, e))?,
    );
    let bundle = Bundle::open(reader, &trusted)?;
    let summary = format!(
        "{}: OK: {} {} (security version {}), {} files, signed by {}",
        file.display(),
        bundle.manifest.product,
        bundle.manifest.version,
        bundle.manifest.security_version,
        bundle.manifest.files.len(),
        bundle
            .signed_by
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    bundle
        .chunks(|_, _, _| Ok::<(), std::convert::Infallible>(()))
        .map_err(|e| match e {
            ChunksError::Bundle(e) => OtaError::Bundle(e),
            ChunksError::Sink(never) => match never {},
        })?;
    writeln!(out, "{summary}").map_err(|e| io(file, e))
}

/// `ota status`: the device's release and its agent, through the control socket.
fn status(socket: &Path, json: bool, out: &mut dyn Write) -> Result<(), OtaError> {
    let update = device::status(socket)?;
    let text = if json {
        serde_json::to_string_pretty(&update).unwrap_or_default()
    } else {
        format!(
            "running {} (slot {}), security version {}; agent {}{}",
            update.version,
            update.slot.as_deref().unwrap_or("factory"),
            update.security_version,
            update.state,
            update
                .last_result
                .as_ref()
                .map(|r| format!(
                    "; last update: {} {}{}",
                    r.result,
                    r.version,
                    r.reason
                        .as_deref()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        )
    };
    writeln!(out, "{text}").map_err(|e| io(socket, e))
}

/// `ota inspect`: what a bundle says about itself, before any verification.
fn inspect_command(file: &Path, json: bool, out: &mut dyn Write) -> Result<(), OtaError> {
    let inspection = inspect(file)?;
    let text = if json {
        serde_json::to_string_pretty(&inspection).unwrap_or_default()
    } else {
        let mut text = format!(
            "{} {} (security version {}, issued at {}), NOT verified: use `ota verify`\n",
            inspection.product,
            inspection.version,
            inspection.security_version,
            inspection.issued_at
        );
        for f in &inspection.files {
            text.push_str(&format!("  {} {:>10}  {}\n", f.mode, f.size, f.path));
        }
        text.push_str(&format!(
            "signatures by: {}\npayload {} bytes, bundle {} bytes",
            inspection.signatures.join(", "),
            inspection.payload_bytes,
            inspection.bundle_bytes
        ));
        text
    };
    writeln!(out, "{text}").map_err(|e| io(file, e))
}

fn write_doc(
    file: &Path,
    doc: &ota_bundle::SignedDoc,
    out: &mut dyn Write,
) -> Result<(), OtaError> {
    std::fs::write(file, doc.to_text()).map_err(|e| io(file, e))?;
    writeln!(
        out,
        "{}: {} signed by {} key(s)",
        file.display(),
        doc.kind,
        doc.signatures.len()
    )
    .map_err(|e| io(file, e))
}

/// Reads the header and manifest of a bundle without trusting it (no signature check).
pub fn inspect(file: &Path) -> Result<Inspection, OtaError> {
    let bundle_bytes = std::fs::metadata(file).map_err(|e| io(file, e))?.len();
    let reader = std::io::BufReader::new(std::fs::File::open(file).map_err(|e| io(file, e))?);
    let (manifest, signers) = ota_bundle::read_manifest_unverified(reader)?;
    Ok(Inspection {
        verified: false,
        product: manifest.product.clone(),
        version: manifest.version.clone(),
        security_version: manifest.security_version,
        issued_at: manifest.issued_at,
        payload_bytes: manifest.payload_len(),
        files: manifest
            .files
            .iter()
            .map(|f| InspectedFile {
                path: f.path.clone(),
                mode: format!("{:o}", f.mode),
                size: f.size,
                chunks: f.chunks.len(),
            })
            .collect(),
        signatures: signers.iter().map(ToString::to_string).collect(),
        bundle_bytes,
    })
}

fn keygen(prefix: &Path, comment: &str, out: &mut dyn Write) -> Result<(), OtaError> {
    let key = SecretKey::generate()?;
    let secret_path = with_suffix(prefix, "key");
    let public_path = with_suffix(prefix, "pub");
    // create_new: never overwrite a key; mode 0600 from the first byte.
    let mut secret = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .map_err(|e| io(&secret_path, e))?;
    secret
        .write_all(key.to_line().as_bytes())
        .map_err(|e| io(&secret_path, e))?;
    secret.sync_all().map_err(|e| io(&secret_path, e))?;
    let mut public = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public_path)
        .map_err(|e| io(&public_path, e))?;
    public
        .write_all(key.public().to_line(comment).as_bytes())
        .map_err(|e| io(&public_path, e))?;
    writeln!(
        out,
        "key id {}: {} (secret, 0600), {}",
        key.public().id(),
        secret_path.display(),
        public_path.display()
    )
    .map_err(|e| io(prefix, e))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn io(path: &Path, source: std::io::Error) -> OtaError {
    OtaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `ota receipt verify`: one line per receipt, `ok` or `FAILED` with the reason.
fn verify_receipts(
    device_keys: &std::path::Path,
    receipts: &[PathBuf],
    out: &mut dyn Write,
) -> Result<(), OtaError> {
    use std::io::Read;
    let devices = ota_bundle::TrustedKeys::load_dir(device_keys)?;
    let mut failed = 0;
    for path in receipts {
        let mut bytes = Vec::new();
        let read = std::fs::File::open(path)
            .and_then(|f| f.take(ota_bundle::MAX_DOC_LEN + 1).read_to_end(&mut bytes));
        let verdict = read
            .map_err(|e| e.to_string())
            .and_then(|_| ota_bundle::Receipt::verify(&bytes, &devices).map_err(|e| e.to_string()));
        let line = match verdict {
            Ok(r) => format!(
                "ok {}: device {} {} {} -> {}{}",
                path.display(),
                r.device,
                r.result,
                r.from,
                r.to,
                r.bundle_digest
                    .map(|d| format!(" (bundle {d})"))
                    .unwrap_or_default()
            ),
            Err(reason) => {
                failed += 1;
                format!("FAILED {}: {reason}", path.display())
            }
        };
        writeln!(out, "{line}").map_err(|e| io(std::path::Path::new("stdout"), e))?;
    }
    if failed > 0 {
        return Err(OtaError::Receipts {
            failed,
            total: receipts.len(),
        });
    }
    Ok(())
}
