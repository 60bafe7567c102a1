//! Every input in `tests/fuzz/seeds/` and `tests/fuzz/regressions/` run through the same
//! checks as the fuzz targets (`tests/fuzz/run.sh`), so what fuzzing found stays fixed.

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
    replay("http", baton_worker::fuzzing::http);
}
