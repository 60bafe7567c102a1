//! The fuzz targets in `tests/fuzz/` (and their regression tests in
//! `tests/fuzz_regressions.rs`) call these: each takes arbitrary bytes, runs one parser or
//! protocol on them, and panics if an invariant breaks. Not an interface for anything else.

use crate::config::{Config, PathContext};
use crate::control::{Reply, answer};
use crate::events::Event;
use crate::status::{StatusReport, SupervisorInfo, UpgradeOutcome, UpgradeResult};
use std::cell::RefCell;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// The config parser: any text gives a config or an error naming the file, never a panic;
/// what a valid config hands to workers reads back.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ctx = PathContext {
        exe_dir: "/opt/baton/bin".into(),
        runtime_dir: None,
        cache_dir: None,
    };
    match Config::parse(text, std::path::Path::new("/etc/baton/baton.toml"), &ctx) {
        Ok(config) => {
            assert!(!config.listeners.is_empty());
            assert!(config.worker.processes >= 1);
            let json = config.worker_settings(Vec::new()).to_json();
            baton_proto::WorkerSettings::from_json(&json).expect("worker settings read back");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("/etc/baton/baton.toml"), "{message}");
        }
    }
}

/// The notify-message parser: any datagram parses or is refused, never a panic; a strict
/// parse agrees with the lenient one.
pub fn notify(data: &[u8]) {
    use baton_proto::NotifyMessage;
    let (lenient, errors) = NotifyMessage::parse_lenient(data);
    match NotifyMessage::parse(data) {
        Ok(strict) => {
            assert!(
                errors.is_empty(),
                "strict parse succeeded, lenient saw {errors:?}"
            );
            assert_eq!(strict, lenient);
        }
        Err(_) => assert!(
            !errors.is_empty(),
            "strict parse failed, lenient saw nothing"
        ),
    }
}

/// The control protocol: any bytes from a client get well-formed reply lines, never a
/// panic or a hang; an error reply is the only one.
pub fn control(data: &[u8]) {
    let replies = control_exchange(data);
    assert!(!replies.is_empty(), "no reply to {data:?}");
    if matches!(replies[0], Reply::Error { .. }) {
        assert_eq!(replies.len(), 1, "more after an error: {replies:?}");
    }
}

/// Sends `input` as a control client would (then closes its writing side) and returns the
/// reply lines, each already checked to be a well-formed [`Reply`]. Panics if the server
/// panics, hangs, or writes anything else.
pub fn control_exchange(input: &[u8]) -> Vec<Reply> {
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        let runtime = cell.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        });
        runtime.block_on(exchange(input))
    })
}

async fn exchange(input: &[u8]) -> Vec<Reply> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    // The supervisor loop, reduced to answering what the control socket asks.
    let supervisor = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Status { reply } => {
                    let _ = reply.send(status());
                }
                Event::Upgrade {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.tx.send(UpgradeOutcome {
                        generation: Some(2),
                        result: UpgradeResult::Succeeded,
                        reason: None,
                        at: "2026-11-23T00:00:00Z".into(),
                        canary: None,
                    });
                }
                Event::Stop {
                    reply: Some(reply), ..
                } => {
                    let _ = reply.send(());
                }
                other => panic!("the control socket sent {other:?}"),
            }
        }
    });
    let (server_read, server_write) = tokio::io::split(server);
    let served = tokio::spawn(answer(server_read, server_write, true, None, events_tx));
    let (mut read, mut write) = tokio::io::split(client);
    let send = async {
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
    };
    let mut output = Vec::new();
    let (_, received) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(send, read.read_to_end(&mut output))
    })
    .await
    .expect("the control connection did not end");
    received.expect("reading the replies");
    if let Err(e) = served.await {
        std::panic::resume_unwind(e.into_panic());
    }
    if let Err(e) = supervisor.await {
        std::panic::resume_unwind(e.into_panic());
    }
    let text = std::str::from_utf8(&output).expect("replies are UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a reply line is cut: {text:?}"
    );
    text.lines()
        .map(|line| {
            serde_json::from_str::<Reply>(line)
                .unwrap_or_else(|e| panic!("not a reply line ({e}): {line:?}"))
        })
        .collect()
}

fn status() -> StatusReport {
    StatusReport {
        version: crate::status::STATUS_VERSION,
        supervisor: SupervisorInfo {
            pid: 1,
            config: "/etc/baton/baton.toml".into(),
            started_at: "2026-11-23T00:00:00Z".into(),
            state: "running".into(),
            upgrade_pending: false,
            ..Default::default()
        },
        listeners: Vec::new(),
        generations: Vec::new(),
        last_upgrade: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_gets_exactly_the_replies_it_should() {
        let kinds = |input: &[u8]| -> Vec<String> {
            control_exchange(input)
                .iter()
                .map(|r| {
                    serde_json::to_value(r).unwrap()["reply"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        };
        assert_eq!(kinds(b"{\"command\":\"status\"}\n"), ["status"]);
        assert_eq!(
            kinds(b"{\"command\":\"upgrade\",\"wait\":true}\n"),
            ["accepted", "upgrade"]
        );
        assert_eq!(
            kinds(b"{\"command\":\"stop\",\"wait\":false}\n"),
            ["accepted"]
        );
        assert_eq!(kinds(b"nonsense\n"), ["error"]);
        assert_eq!(kinds(b""), ["error"]);
    }
}
