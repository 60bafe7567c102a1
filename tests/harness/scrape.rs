//! Reading Baton's metrics as a monitoring system would: scrape `GET /metrics`, pick
//! samples out of the text format, and have Prometheus' own `promtool` check it.

use std::net::SocketAddr;
use std::path::Path;

/// The text of one scrape of `addr` (fails on a refused connection or a non-200).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = crate::get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics answered {status}: {body}");
    Ok(body)
}

/// The samples of `name` whose labels include every one of `labels`, added up; `None`
/// when there is no such sample.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if all && let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Runs `promtool check metrics` on `text`; `Err` holds what it said. Debian's
/// `prometheus` package provides it (`.ci/run` installs it).
pub fn promtool_check(text: &str, dir: &Path) -> Result<(), String> {
    use std::io::Write;
    let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("promtool is not installed (apt-get install prometheus)")?;
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {promtool}: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics ({}): {said}", out.status))
    }
}
