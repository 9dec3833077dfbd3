//! A blocking client of the depot, for `ota-depot`'s operator commands and a device's depot
//! source: plain HTTP (the depot sits on a closed network; integrity comes from signatures, not
//! from the transport), one timeout per phase, and every answer read with a bound.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ota_bundle::SecretKey;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth;
use crate::wire::{
    BundleAccepted, ErrorBody, Nonce, Poll, PollReply, Published, Report, ReportReply,
    RolloutStatus, Status,
};

/// Largest JSON answer read (a status with thousands of devices fits).
pub const MAX_REPLY: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the depot {url} cannot be reached: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the depot refused {what} ({status}): {error}")]
    Refused {
        what: String,
        status: u16,
        error: String,
    },
    #[error("the depot's answer to {what} is not valid: {reason}")]
    Protocol { what: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClientError {
    /// The `ota-depot` exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => crate::exit::UNREACHABLE,
            ClientError::Refused { .. } => crate::exit::REFUSED,
            ClientError::Protocol { .. } => crate::exit::FAILURE,
            ClientError::Io { .. } => crate::exit::IO,
        }
    }
}

/// One depot, by its base URL (`http://host:port`).
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    /// `timeout` bounds connecting and waiting for each answer (not a whole upload or download).
    pub fn new(base: &str, timeout: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_recv_body(Some(timeout))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            token: None,
        }
    }

    /// The operator's token, for publish, halt, resume and abort.
    pub fn with_token(mut self, token: String) -> Client {
        self.token = Some(token);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, error: ureq::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.base.clone(),
            reason: error.to_string(),
        }
    }

    /// Reads a JSON answer, or turns a 4xx/5xx into `Refused` with the depot's own words.
    fn answer<T: DeserializeOwned>(
        &self,
        what: &str,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> Result<T, ClientError> {
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_vec()
            .map_err(|e| self.unreachable(e))?;
        if !(200..300).contains(&status) {
            let error = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused {
                what: what.to_owned(),
                status,
                error,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            what: what.to_owned(),
            reason: e.to_string(),
        })
    }

    fn admin(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        match &self.token {
            Some(token) => request.header("authorization", format!("Bearer {token}")),
            None => request,
        }
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        let response = self
            .agent
            .get(self.url("/api/v1/status"))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer("the status", response)
    }

    /// Uploads a bundle file; the depot verifies it whole before it keeps it.
    pub fn upload_bundle(&self, path: &Path) -> Result<BundleAccepted, ClientError> {
        let io = |source| ClientError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let response = self
            .admin(self.agent.post(self.url("/api/v1/bundles")))
            .header("content-length", len.to_string())
            // The depot may refuse on the headers alone (the token, the size): then no byte
            // of the bundle is sent, and its answer is read instead of a broken pipe.
            .header("expect", "100-continue")
            .send(ureq::SendBody::from_reader(&mut file))
            .map_err(|e| self.unreachable(e))?;
        self.answer(&format!("the bundle {}", path.display()), response)
    }

    /// Publishes a signed rollout plan (its bundle uploaded first).
    pub fn publish_plan(&self, plan: &[u8]) -> Result<Published, ClientError> {
        let response = self
            .admin(self.agent.post(self.url("/api/v1/rollouts")))
            .send(plan)
            .map_err(|e| self.unreachable(e))?;
        self.answer("the rollout plan", response)
    }

    /// `halt`, `resume` or `abort` one rollout.
    pub fn control(&self, id: u64, verb: &str) -> Result<RolloutStatus, ClientError> {
        let response = self
            .admin(
                self.agent
                    .post(self.url(&format!("/api/v1/rollouts/{id}/{verb}"))),
            )
            .send(&[][..])
            .map_err(|e| self.unreachable(e))?;
        self.answer(&format!("{verb} of rollout {id}"), response)
    }

    fn nonce(&self) -> Result<String, ClientError> {
        let response = self
            .agent
            .get(self.url("/api/v1/nonce"))
            .call()
            .map_err(|e| self.unreachable(e))?;
        Ok(self.answer::<Nonce>("a nonce", response)?.nonce)
    }

    /// One signed request: a fresh nonce, then the body signed with the device key.
    fn signed<T: DeserializeOwned>(
        &self,
        key: &SecretKey,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("wire types serialise");
        let nonce = self.nonce()?;
        let signed = auth::sign(key, "POST", path, &nonce, &body);
        let response = self
            .agent
            .post(self.url(path))
            .header("content-type", "application/json")
            .header(auth::KEY_HEADER, &signed.key)
            .header(auth::NONCE_HEADER, &signed.nonce)
            .header(auth::SIGNATURE_HEADER, &signed.signature)
            .send(&body[..])
            .map_err(|e| self.unreachable(e))?;
        self.answer(path, response)
    }

    /// Asks what this device should install (signed with its device key).
    pub fn poll(&self, key: &SecretKey, poll: &Poll) -> Result<PollReply, ClientError> {
        self.signed(key, "/api/v1/poll", poll)
    }

    /// Reports progress or an outcome of one rollout (signed with the device key).
    pub fn report(&self, key: &SecretKey, report: &Report) -> Result<ReportReply, ClientError> {
        self.signed(key, "/api/v1/report", report)
    }

    /// Bytes `range` of the bundle at `path` (an offer's `bundle_path`, `size` bytes long), as
    /// a reader that yields at most that many. The whole file is asked for without `Range`
    /// (200), any other part with it (206). A depot that ignores the range or answers another
    /// one is refused: a resuming device must never mistake which bytes it got. `timeout` (the
    /// client's) bounds the whole body: ask for parts a slow link can carry in that time.
    pub fn download(
        &self,
        path: &str,
        range: std::ops::Range<u64>,
        size: u64,
        device: Option<&str>,
    ) -> Result<impl Read + Send + use<>, ClientError> {
        let what = format!("bytes {}-{} of {path}", range.start, range.end);
        if range.start >= range.end || range.end > size {
            return Err(ClientError::Protocol {
                what,
                reason: format!("not a range within the {size} bytes of the bundle"),
            });
        }
        let whole = range.start == 0 && range.end == size;
        let mut request = self.agent.get(self.url(path));
        if !whole {
            request = request.header("range", format!("bytes={}-{}", range.start, range.end - 1));
        }
        if let Some(device) = device {
            request = request.header(auth::DOWNLOADER_HEADER, device);
        }
        let mut response = request.call().map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let expected = if whole { 200 } else { 206 };
        if status != expected {
            let _ = response.body_mut().with_config().limit(4096).read_to_vec();
            return Err(ClientError::Refused {
                what,
                status,
                error: format!("expected {expected}"),
            });
        }
        if !whole {
            let got = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let wanted = format!("bytes {}-{}/{size}", range.start, range.end - 1);
            if got != wanted {
                return Err(ClientError::Protocol {
                    what,
                    reason: format!("Content-Range is {got:?}, not {wanted:?}"),
                });
            }
        }
        Ok(response
            .into_body()
            .into_with_config()
            .limit(range.end - range.start)
            .reader())
    }
}
