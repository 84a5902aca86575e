//! The fleet link of a box whose database is damaged: it serves nothing that needs the
//! database, but stays reachable, so the operator learns why from afar instead of through a
//! restart loop. Presence says `corrupt` with the reason and the way out; every command gets
//! that answer.

use std::time::Duration;

use serde_json::{Value, json};
use tern_update::topics::{Device as Topics, Route};
use tokio_util::sync::CancellationToken;

use super::commands;
use super::mqtt::{self, Event};
use crate::config::FleetConfig;
use crate::control::{CmdError, Code};

/// What an operator does about it (also in ternd's log and the README).
pub fn recovery(state_dir: &std::path::Path) -> String {
    format!(
        "stop ternd, move {dir}/tern.db* aside (keep them for a look), start ternd: it makes a \
         new database; the update key set and anti-rollback floors come back from \
         {dir}/trust.json, models are installed again from the configuration; results and \
         messages not yet sent in the old file are lost",
        dir = state_dir.display()
    )
}

/// Keep the link up, saying `corrupt`, until `cancel`.
pub async fn serve(cfg: FleetConfig, reason: String, recovery: String, cancel: CancellationToken) {
    let topics = Topics::new(&cfg.prefix, &cfg.device, &cfg.groups);
    let will = json!({"state": "offline", "device": cfg.device, "graceful": false});
    let (link, mut session) = match mqtt::connect(
        &cfg,
        &topics.state(),
        will.to_string().as_bytes(),
        cfg.commands.max_payload_bytes,
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "fleet link not started");
            return cancel.cancelled().await;
        }
    };
    let presence = json!({
        "state": "corrupt", "device": cfg.device, "version": crate::VERSION,
        "reason": reason, "recovery": recovery,
    });
    let answer = CmdError::new(
        Code::Internal,
        format!(
            "this box's database is damaged ({reason}); it serves nothing until it is repaired: {recovery}"
        ),
    );
    let mut failures = 0u32;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = session.poll() => ev,
        };
        match ev {
            Ok(Event::Connected) => {
                failures = 0;
                for f in topics.filters(false) {
                    let _ = link.subscribe(&f);
                }
                let _ = link.publish(
                    &topics.state(),
                    presence.to_string().into_bytes(),
                    true,
                    None,
                );
            }
            Ok(Event::Message(m)) => {
                if !matches!(topics.route(&m.topic), Route::Command { .. }) || m.payload.is_empty()
                {
                    continue;
                }
                let id = commands::peek_id(&m.payload, cfg.commands.max_payload_bytes);
                let reply: Value = commands::reply_err(id.as_deref(), &answer);
                let topic = topics.reply(id.as_deref().unwrap_or("invalid"));
                let _ = link.publish(&topic, reply.to_string().into_bytes(), false, None);
            }
            Ok(_) => {}
            Err(e) => {
                let delay = mqtt::backoff(failures, cfg.reconnect_max);
                tracing::debug!(error = %e, retry_in = ?delay, "fleet link down");
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    // A clean stop says so, as a healthy box's does.
    let bye = json!({"state": "offline", "device": cfg.device, "graceful": true});
    let _ = link.publish(&topics.state(), bye.to_string().into_bytes(), true, None);
    link.disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(session.poll().await, Ok(Event::Disconnected) | Err(_)) {}
    })
    .await;
}
