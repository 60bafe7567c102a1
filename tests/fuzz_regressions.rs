//! Every input in `tests/fuzz/seeds/` and `tests/fuzz/regressions/` run through the same
//! checks as the fuzz targets (`tests/fuzz/run.sh`), so what fuzzing found stays fixed.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The inputs of one target, named by file.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found.sort();
    assert!(!found.is_empty(), "no inputs for {target}");
    found
}

fn replay(target: &str, check: fn(&[u8])) {
    for (path, bytes) in inputs(target) {
        if std::panic::catch_unwind(|| check(&bytes)).is_err() {
            panic!("{target}: {} fails", path.display());
        }
    }
}

#[test]
fn config_inputs() {
    replay("config", baton::fuzzing::config);
}

#[test]
fn notify_inputs() {
    replay("notify", baton::fuzzing::notify);
}

#[test]
fn control_inputs() {
    replay("control", baton::fuzzing::control);
}

#[test]
fn http_inputs() {
    // As tests/fuzz/run.sh fuzzes it: with the example plugins loaded.
    let dir = &baton_tests::bins().dir;
    let plugins: Vec<String> = ["echo", "hello"]
        .iter()
        .map(|p| dir.join(format!("libbaton_{p}.so")).display().to_string())
        .collect();
    // The plugins answer (the fuzzing reaches their handlers, not just 404s).
    let out = baton_worker::fuzzing::http_exchange(
        &plugins,
        b"GET /hello/you HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    );
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    for (path, bytes) in inputs("http") {
        let plugins = plugins.clone();
        if std::panic::catch_unwind(|| baton_worker::fuzzing::http_with(&plugins, &bytes)).is_err()
        {
            panic!("http: {} fails", path.display());
        }
    }
}
