//! The read-only status page: server-rendered HTML, no script, for an operator's browser.
//! Every string shown is escaped (versions and ids come from signed plans and device keys,
//! but a page must not depend on that).

use std::fmt::Write;

use depot_proto::wire::{RolloutState, Status, WaveState};

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn wave_word(state: WaveState) -> &'static str {
    match state {
        WaveState::Waiting => "waiting",
        WaveState::Open => "open",
        WaveState::Done => "done",
    }
}

/// The page for `status`.
pub fn render(status: &Status) -> String {
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>quote-edge depot</title><style>\
         body{font:16px sans-serif;margin:2em;color:#111}table{border-collapse:collapse;margin:.5em 0 1.5em}\
         td,th{border:1px solid #999;padding:.3em .8em;text-align:left}\
         .running{color:#05a}.halted{color:#b00}.completed{color:#070}.aborted{color:#666}\
         </style></head><body>\n<h1>quote-edge depot</h1>\n",
    );
    let _ = writeln!(html, "<p>Devices enrolled: {}</p>", status.devices);
    if status.rollouts.is_empty() {
        html.push_str("<p>No rollout published.</p>\n");
    }
    for r in &status.rollouts {
        let state = r.state.as_str();
        let _ = writeln!(
            html,
            "<h2>Rollout {} &middot; {} {} &middot; <span class=\"{state}\">{}</span></h2>",
            r.id,
            escape(&r.product),
            escape(&r.version),
            state.to_uppercase()
        );
        if let Some(reason) = &r.reason {
            let _ = writeln!(html, "<p>Reason: {}</p>", escape(reason));
        }
        let _ = writeln!(
            html,
            "<p>Bundle {} &middot; {} bytes served in {} responses</p>",
            escape(&r.bundle[..16.min(r.bundle.len())]),
            r.bytes_served,
            r.downloads
        );
        html.push_str(
            "<table><tr><th>Wave</th><th>State</th><th>Devices</th><th>Committed</th><th>Failed</th><th>Pending</th></tr>\n",
        );
        for (i, w) in r.waves.iter().enumerate() {
            let _ = writeln!(
                html,
                "<tr><td>{i}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                wave_word(w.state),
                w.size,
                w.committed,
                w.failed,
                w.pending
            );
        }
        html.push_str("</table>\n<table><tr><th>Device</th><th>Wave</th><th>State</th></tr>\n");
        for m in &r.members {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&m.device),
                m.wave,
                m.state.as_str()
            );
        }
        html.push_str("</table>\n");
        if r.state == RolloutState::Halted {
            let _ = writeln!(
                html,
                "<p>Resume with <code>ota-depot resume --depot URL {}</code>, or abort it.</p>",
                r.id
            );
        }
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use depot_proto::wire::{Member, MemberState, RolloutStatus, WaveStatus};

    use super::*;

    #[test]
    fn the_page_shows_each_wave_and_device_and_escapes_what_it_shows() {
        let status = Status {
            rollouts: vec![RolloutStatus {
                id: 3,
                product: "quote-edge".into(),
                version: "2.0.0<script>".into(),
                bundle: "ab".repeat(32),
                state: RolloutState::Halted,
                reason: Some("1 of 1 reports failed".into()),
                waves: vec![WaveStatus {
                    size: 1,
                    committed: 0,
                    failed: 1,
                    pending: 0,
                    state: WaveState::Done,
                }],
                bytes_served: 10,
                downloads: 1,
                members: vec![Member {
                    device: "00aa".into(),
                    wave: 0,
                    state: MemberState::RolledBack,
                }],
            }],
            devices: 12,
            fleet: Vec::new(),
        };
        let html = render(&status);
        assert!(html.contains("Devices enrolled: 12"), "{html}");
        assert!(html.contains("2.0.0&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("HALTED"), "{html}");
        assert!(
            html.contains("<td>00aa</td><td>0</td><td>rolled_back</td>"),
            "{html}"
        );
    }
}
