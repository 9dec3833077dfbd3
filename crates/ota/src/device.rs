//! `ota apply` and `ota status`: talk to a device's supervisor over its control socket (one
//! JSON request line, one JSON reply) through `edge_proto::client`, with std only. The OTA
//! agent in the supervisor does the work; this only asks and reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_proto::client::Client;
use edge_proto::{Reply, Request, UpdateStatus};

use crate::OtaError;

fn ask(socket: &Path, request: &Request) -> Result<Reply, OtaError> {
    Ok(Client::new(socket).request(request)?)
}

/// The `update` part of the device's status.
pub fn status(socket: &Path) -> Result<UpdateStatus, OtaError> {
    match ask(socket, &Request::Status)? {
        Reply::Status(status) => Ok(status.update),
        Reply::Error { message, .. } => Err(OtaError::Device(message)),
        other => Err(OtaError::Device(format!("unexpected reply {other:?}"))),
    }
}

/// Hands `bundle` to the agent, then reports its progress until the update ends: one line per
/// change (JSON lines with `json`). Ok(true) when the update was committed.
pub fn apply(
    socket: &Path,
    bundle: &Path,
    json: bool,
    out: &mut dyn Write,
) -> Result<bool, OtaError> {
    let bundle: PathBuf = std::path::absolute(bundle).map_err(|source| OtaError::Io {
        path: bundle.to_owned(),
        source,
    })?;
    let before = status(socket)?.last_result;
    match ask(
        socket,
        &Request::Apply {
            bundle: bundle.display().to_string(),
        },
    )? {
        Reply::Accepted { .. } => {}
        Reply::Error { message, .. } => return Err(OtaError::Device(message)),
        other => return Err(OtaError::Device(format!("unexpected reply {other:?}"))),
    }
    let mut last_line = String::new();
    loop {
        let update = status(socket)?;
        let line = if json {
            serde_json::to_string(&update).expect("status serialises")
        } else {
            match &update.progress {
                Some(p) => format!(
                    "{} {} {}/{} bytes",
                    update.state,
                    update.target.as_deref().unwrap_or(""),
                    p.done,
                    p.total
                ),
                None => format!(
                    "{} {}",
                    update.state,
                    update.target.as_deref().unwrap_or("")
                ),
            }
        };
        if line != last_line {
            let _ = writeln!(out, "{line}");
            last_line = line;
        }
        if update.state == edge_proto::UpdateState::Idle && update.last_result != before {
            let Some(result) = update.last_result else {
                if !json {
                    let _ = writeln!(out, "the update ended without a result");
                }
                return Ok(false);
            };
            if !json {
                let _ = writeln!(
                    out,
                    "{} {}{}",
                    result.result,
                    result.version,
                    result
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
            }
            return Ok(result.result == edge_proto::UpdateOutcome::Committed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
