//! Watches the plugin directory (inotify) and reports a change once the directory has
//! been quiet for `plugins.watch_debounce` and every plugin file kept the same size and
//! modification time across one more debounce period (a copy in progress does not count).
//! A stable size and time are no proof that a writer has finished (a `cp` may pause), so
//! a change also waits while any plugin file is still open for writing by some process
//! (a read lease is refused exactly then), and the log says which file it waits for.
//! Dotfiles and names that are not `*.so` (such as `*.tmp`) are ignored. Whether the
//! plugin set really changed is for the supervisor to decide, by hash.

use crate::events::Event;
use crate::plugins::is_plugin_name;
use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc::UnboundedSender;

/// Starts watching `dir`; the task ends when the supervisor's loop is gone.
pub fn spawn(
    dir: PathBuf,
    debounce: Duration,
    events: UnboundedSender<Event>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MODIFY
            | WatchMask::ATTRIB,
    )?;
    let stream = inotify.into_event_stream([0u8; 4096])?;
    tracing::info!("watching plugin directory {}", dir.display());
    Ok(tokio::spawn(run(dir, debounce, stream, events)))
}

async fn run(
    dir: PathBuf,
    debounce: Duration,
    mut stream: inotify::EventStream<[u8; 4096]>,
    events: UnboundedSender<Event>,
) {
    loop {
        // Wait for a change that concerns a plugin file.
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    let relevant = event
                        .name
                        .as_ref()
                        .and_then(|n| n.to_str())
                        .is_some_and(is_plugin_name);
                    if relevant {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::error!("plugin directory watch failed: {e}");
                    return;
                }
                None => return,
            }
        }
        // Debounce, then require the files to be stable and closed by their writers.
        let mut waited_for = None;
        loop {
            while let Ok(Some(_)) = tokio::time::timeout(debounce, stream.next()).await {}
            let before = snapshot(&dir);
            tokio::time::sleep(debounce).await;
            if snapshot(&dir) != before {
                continue;
            }
            match being_written(&dir) {
                None => break,
                Some(name) => {
                    if waited_for.as_ref() != Some(&name) {
                        tracing::info!(
                            "plugin directory changed, but {} is still open for writing: waiting until its writer closes it",
                            dir.join(&name).display()
                        );
                        waited_for = Some(name);
                    }
                }
            }
        }
        if events.send(Event::PluginsChanged).is_err() {
            return;
        }
    }
}

/// The first plugin file some process still has open for writing, if any.
fn being_written(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_plugin_name(n))
        .collect();
    names.sort();
    names.into_iter().find(|name| {
        std::fs::File::open(dir.join(name)).is_ok_and(|f| {
            baton_sys::lease::writers(std::os::fd::AsFd::as_fd(&f))
                == baton_sys::lease::Writers::Some
        })
    })
}

/// Names, sizes and modification times of the plugin files.
fn snapshot(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !is_plugin_name(&name) {
                return None;
            }
            let meta = e.metadata().ok()?;
            Some((name, meta.len(), meta.modified().ok()))
        })
        .collect();
    out.sort();
    out
}
