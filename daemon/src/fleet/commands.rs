//! Fleet commands: bounded before parsing, checked (signature, target, freshness, replay),
//! answered once per id, and carried out by [`Control`].
//!
//! ```text
//!  payload ─► size bound ─► envelope {id, args, auth} ─► known name? ─► signed if required
//!          ─► id seen? ─► first reply again          (nothing runs twice)
//!          ─► nonce seen? ─► unauthorized            (replay)
//!          ─► Control::execute ─► reply + id + nonce in one transaction ─► publish reply
//! ```

use rusqlite::OptionalExtension as _;
use serde_json::{Value, json};

use crate::config::{CommandsConfig, SignPolicy};
use crate::control::{CmdError, Code, Control, commands};
use crate::store::now_ms;
use tern_update::command::{self as signing, Auth};

/// How long replies are remembered for idempotency, and at most how many.
pub const REPLY_WINDOW_MS: i64 = 24 * 3600 * 1000;
pub const REPLY_WINDOW_COUNT: i64 = 10_000;
/// And at most this many bytes of them: unsigned read commands are anyone's to send.
pub const REPLY_WINDOW_BYTES: i64 = 8 * 1024 * 1024;
pub const MAX_ID_LEN: usize = 128;

/// Ids of commands being carried out right now, so a repeat that arrives meanwhile is told to
/// wait, not that the command was lost.
#[derive(Clone, Default)]
pub struct Running(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl Running {
    fn contains(&self, id: &str) -> bool {
        self.0.lock().expect("running lock").contains(id)
    }

    fn insert(&self, id: &str) {
        self.0.lock().expect("running lock").insert(id.to_string());
    }

    fn remove(&self, id: &str) {
        self.0.lock().expect("running lock").remove(id);
    }
}

enum Claim {
    /// The id was seen before: its fingerprint and reply (None: never finished).
    Earlier((String, Option<String>)),
    Replayed,
    Mine,
}

/// What an id is bound to: the command, its target and its arguments.
fn fingerprint(name: &str, target: &str, args: &Value) -> String {
    let text = format!(
        "{name}\n{target}\n{}",
        tern_update::command::canonical_json(args)
    );
    tern_update::sha256_hex(text.as_bytes())
}

/// A command as it arrived: which command, to whom, and the raw payload.
pub struct Incoming {
    pub name: String,
    /// The device id for a device topic, `group:<name>` for a group topic.
    pub target: String,
    pub payload: bytes::Bytes,
}

/// The id of a command if it can be read at all; replies to unreadable ones use `invalid`.
pub fn peek_id(payload: &[u8], max: usize) -> Option<String> {
    if payload.len() > max {
        return None;
    }
    let v: Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("id")?.as_str()?;
    valid_id(id).then(|| id.to_string())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

pub fn reply_ok(id: &str, result: Value) -> Value {
    json!({"id": id, "ok": true, "result": result})
}

pub fn reply_err(id: Option<&str>, e: &CmdError) -> Value {
    json!({"id": id, "ok": false, "error": {"code": e.code.as_str(), "message": e.message}})
}

pub(crate) struct Envelope {
    pub(crate) id: String,
    pub(crate) args: Value,
    auth: Option<Auth>,
}

pub(crate) fn envelope(payload: &[u8], max: usize) -> Result<Envelope, (Option<String>, CmdError)> {
    if payload.len() > max {
        return Err((
            None,
            CmdError::new(
                Code::BadRequest,
                format!(
                    "payload is {} bytes, more than the {max} allowed",
                    payload.len()
                ),
            ),
        ));
    }
    let bad = |id: Option<String>, m: String| (id, CmdError::new(Code::BadRequest, m));
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| bad(None, format!("payload is not JSON: {e}")))?;
    let Value::Object(mut map) = v else {
        return Err(bad(None, "payload must be a JSON object".into()));
    };
    let id = match map.remove("id") {
        Some(Value::String(s)) if valid_id(&s) => s,
        Some(Value::String(_)) => {
            return Err(bad(
                None,
                format!("`id` must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 - _ . :"),
            ));
        }
        Some(_) => return Err(bad(None, "`id` must be a string".into())),
        None => return Err(bad(None, "`id` is missing".into())),
    };
    let args = map.remove("args").unwrap_or(Value::Null);
    if !(args.is_object() || args.is_null()) {
        return Err(bad(Some(id), "`args` must be a JSON object".into()));
    }
    let auth = match map.remove("auth") {
        None => None,
        Some(a) => Some(serde_json::from_value::<Auth>(a).map_err(|e| {
            (
                Some(id.clone()),
                CmdError::new(Code::Unauthorized, format!("`auth` is malformed: {e}")),
            )
        })?),
    };
    if let Some(k) = map.keys().next() {
        return Err(bad(
            Some(id),
            format!("unknown field `{k}`; a command has `id`, `args` and optionally `auth`"),
        ));
    }
    Ok(Envelope { id, args, auth })
}

/// Handle one command to the end; returns the id (if readable) and the reply to publish.
pub async fn handle(
    control: &Control,
    cfg: &CommandsConfig,
    running: &Running,
    cmd: Incoming,
) -> (Option<String>, Value) {
    let env = match envelope(&cmd.payload, cfg.max_payload_bytes) {
        Ok(e) => e,
        Err((id, e)) => return (id.clone(), reply_err(id.as_deref(), &e)),
    };
    let id = env.id.clone();
    match run(control, cfg, running, &cmd, env).await {
        Ok(reply) => (Some(id), reply),
        Err(e) => (Some(id.clone()), reply_err(Some(&id), &e)),
    }
}

async fn run(
    control: &Control,
    cfg: &CommandsConfig,
    running: &Running,
    cmd: &Incoming,
    env: Envelope,
) -> Result<Value, CmdError> {
    let Some(entry) = commands::find(&cmd.name).filter(|e| e.spec.fleet) else {
        return Err(crate::control::unknown(&cmd.name));
    };
    let changes_state = entry.spec.changes_state;
    // Forcing a version past the anti-rollback floor is signed, whatever the policy.
    let forced = cmd.name == "models.activate" && env.args.get("force") == Some(&Value::Bool(true));
    if forced && cfg.keys.is_empty() {
        return Err(CmdError::new(
            Code::Unauthorized,
            "`force` needs a signed command, and this box has no commands.keys",
        ));
    }
    let must_sign = forced
        || match cfg.require_signed {
            SignPolicy::None => false,
            SignPolicy::StateChanging => changes_state,
            SignPolicy::All => true,
        };
    let nonce = if must_sign {
        let auth = env.auth.as_ref().ok_or_else(|| {
            CmdError::new(Code::Unauthorized, signing::AuthError::Missing.to_string())
        })?;
        signing::verify(
            &cfg.keys,
            signing::Signed {
                name: &cmd.name,
                target: &cmd.target,
                id: &env.id,
                args: &env.args,
            },
            auth,
            now_ms() / 1000,
            cfg.max_skew_secs,
        )
        .map_err(|e| CmdError::new(Code::Unauthorized, e.to_string()))?;
        Some(auth.nonce.clone())
    } else {
        None
    };

    // A repeated id gets the first reply and nothing runs again. The id is claimed (with the
    // command's fingerprint and its nonce) in one transaction before anything runs, so a crash
    // mid-command, or the same id arriving twice at once, can never run it twice.
    let fingerprint = fingerprint(&cmd.name, &cmd.target, &env.args);
    let (id, n, fp) = (env.id.clone(), nonce.clone(), fingerprint.clone());
    let claim = control
        .store()
        .call(move |c| {
            let tx = c.transaction()?;
            let earlier: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT fingerprint, reply FROM command_replies WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some(e) = earlier {
                return Ok(Claim::Earlier(e));
            }
            if let Some(n) = &n {
                let seen: Option<i64> = tx
                    .query_row("SELECT 1 FROM command_nonces WHERE nonce = ?1", [n], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if seen.is_some() {
                    return Ok(Claim::Replayed);
                }
                tx.execute(
                    "INSERT INTO command_nonces (nonce, ts_ms) VALUES (?1, ?2)",
                    rusqlite::params![n, now_ms()],
                )?;
            }
            tx.execute(
                "INSERT INTO command_replies (id, fingerprint, reply, ts_ms) VALUES (?1, ?2, NULL, ?3)",
                rusqlite::params![id, fp, now_ms()],
            )?;
            tx.commit()?;
            Ok(Claim::Mine)
        })
        .await?;
    match claim {
        Claim::Earlier((fp, _)) if fp != fingerprint => {
            return Err(CmdError::new(
                Code::Conflict,
                format!(
                    "id `{}` was already used for a different command; use a new id",
                    env.id
                ),
            ));
        }
        Claim::Earlier((_, Some(reply))) => {
            tracing::info!(id = %env.id, command = %cmd.name, "repeated command id: first reply sent again");
            return Ok(serde_json::from_str(&reply).unwrap_or(Value::Null));
        }
        Claim::Earlier((_, None)) if running.contains(&env.id) => {
            return Err(CmdError::new(
                Code::Busy,
                format!(
                    "command `{}` is still running; send the same id again later",
                    env.id
                ),
            ));
        }
        Claim::Earlier((_, None)) => {
            return Err(CmdError::new(
                Code::Conflict,
                format!(
                    "command `{}` is running or was interrupted (its outcome is unknown); \
                     check `status` and use a new id",
                    env.id
                ),
            ));
        }
        Claim::Replayed => {
            return Err(CmdError::new(
                Code::Unauthorized,
                "nonce was already used: replayed command",
            ));
        }
        Claim::Mine => running.insert(&env.id),
    }

    if changes_state {
        tracing::info!(id = %env.id, command = %cmd.name, target = %cmd.target, signed = nonce.is_some(), "command");
    }
    let result = entry.run(control, env.args).await;
    let reply = match &result {
        Ok(v) => reply_ok(&env.id, v.clone()),
        Err(e) => reply_err(Some(&env.id), e),
    };
    // A busy engine is a moment, not an answer: release the id so the same command can be
    // sent again.
    let busy = matches!(&result, Err(e) if e.code == Code::Busy);
    let (id, text, nonce_keep_ms) = (
        env.id.clone(),
        reply.to_string(),
        (cfg.max_skew_secs * 2 + 1) * 1000,
    );
    let stored = control
        .store()
        .call(move |c| {
            let now = now_ms();
            let tx = c.transaction()?;
            if busy {
                tx.execute("DELETE FROM command_replies WHERE id = ?1", [&id])?;
                if let Some(n) = &nonce {
                    tx.execute("DELETE FROM command_nonces WHERE nonce = ?1", [n])?;
                }
            } else {
                tx.execute(
                    "UPDATE command_replies SET reply = ?2, ts_ms = ?3, bytes = ?4 WHERE id = ?1",
                    rusqlite::params![id, text, now, text.len() as i64],
                )?;
            }
            // Past the count or the bytes, the oldest replies go. Claims still running
            // (bytes 0) are never evicted by count or size.
            tx.execute(
                "DELETE FROM command_replies WHERE ts_ms < ?1
                 OR id IN (SELECT id FROM (
                     SELECT id, row_number() OVER w AS n, sum(bytes) OVER w AS run
                     FROM command_replies WHERE bytes > 0
                     WINDOW w AS (ORDER BY ts_ms DESC, id DESC))
                   WHERE n > ?2 OR run > ?3)",
                rusqlite::params![
                    now - REPLY_WINDOW_MS,
                    REPLY_WINDOW_COUNT,
                    REPLY_WINDOW_BYTES
                ],
            )?;
            // A nonce older than twice the skew window (plus the second timestamps are
            // rounded to) cannot verify again, so it need not be remembered longer.
            tx.execute(
                "DELETE FROM command_nonces WHERE ts_ms < ?1",
                [now - nonce_keep_ms],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await;
    running.remove(&env.id);
    if let Err(e) = stored {
        // The command has run; its real reply goes out even if it could not be remembered.
        tracing::error!(id = %env.id, error = %e, "command reply not stored");
    }
    Ok(reply)
}
